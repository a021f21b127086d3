"""Fault-injection probes of the training command: bad input, damaged files, signals, kills, concurrent runs.

Each probe runs ``python -m bbfused.train`` in its own process (as a user would), in a scratch folder, and is
classified:

* handled: the expected exit code, a message naming the problem and what to do, no traceback for an input
  error, and whatever the probe checks afterwards (a resume that works, files left consistent);
* weak: the expected exit code and the problem named, but not what to do;
* failed: anything else (another exit code, a traceback for bad input, lost or inconsistent files, a hang).

Usage: ``python benchmarks/trainer_probes.py [--only NAME ...] [--json PATH]``. All probes take a few minutes
on a 2-core CPU (each process imports torch); tests/test_train_faults.py holds the same faults as unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Started in the background by a shell without job control, this process and its children would ignore SIGINT,
# and the Ctrl-C probes would wait for nothing (an exec resets a handled signal to its default).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
TINY = ["--limit-train", "256", "--limit-test", "256", "--batch-size", "32", "--bb-backend", "eager"]
TINY += ["--device", "cpu"]
TIMEOUT = 300


@dataclass
class Result:
    code: int | None  # None: it did not end in time
    out: str
    err: str


@dataclass
class Probe:
    """One fault. ``argv`` and ``setup`` get the probe's scratch folder; ``stop`` sends a signal once a stdout
    line starts with its text (whitespace collapsed); ``check`` returns what went wrong afterwards, or None."""

    name: str
    argv: Callable[[Path], list[str]]
    code: int
    problem: tuple[str, ...]
    fix: tuple[str, ...] = ()
    setup: Callable[[Path], None] | None = None
    stop: tuple[int, str] | None = None
    check: Callable[[Path, Result], str | None] | None = None
    notes: list[str] = field(default_factory=list)


def command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "bbfused.train", *argv]


def run(argv: list[str], cwd: Path) -> Result:
    try:
        done = subprocess.run(command(argv), env=ENV, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as timeout:
        return Result(None, str(timeout.stdout or ""), str(timeout.stderr or ""))
    return Result(done.returncode, done.stdout, done.stderr)


def run_and_stop(argv: list[str], cwd: Path, signum: int, after: str) -> Result:
    """Start the command, send ``signum`` once a stdout line starts with ``after``; stderr goes to a file."""
    errors = cwd / "stderr.txt"
    with errors.open("w") as stderr_file:
        process = subprocess.Popen(
            command(argv), env=ENV, cwd=cwd, stdout=subprocess.PIPE, stderr=stderr_file, text=True
        )
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if " ".join(line.split()).startswith(after):
                process.send_signal(signum)
                break
        rest, _ = process.communicate(timeout=TIMEOUT)
        lines.append(rest)
        code = process.returncode
    except subprocess.TimeoutExpired:
        code = None
    finally:
        process.kill()
    return Result(code, "".join(lines), errors.read_text())


# ------------------------------------------------------------------------------------------- fixtures
def image_folder(root: Path, classes: int = 2, per_class: int = 4) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for index in range(classes):
            folder = root / split / f"c{index}"
            folder.mkdir(parents=True)
            for n in range(per_class):
                Image.new("RGB", (12, 12), (40 * index, 7 * n, 90)).save(folder / f"{n}.png")
    return root


_FINISHED: list[Path] = []


def finished_run(scratch: Path) -> Path:
    """A copy of one finished one-epoch run's folder (trained once per session)."""
    if not _FINISHED:
        base = Path(tempfile.mkdtemp(prefix="bbfused-probes-")) / "run"
        result = run([*TINY, "--epochs", "1", "--output-dir", str(base)], base.parent)
        if result.code != 0:
            raise RuntimeError(f"the base run failed:\n{result.err[-3000:]}")
        _FINISHED.append(base)
    copy = scratch / "run"
    shutil.copytree(_FINISHED[0], copy)
    return copy


def edit_checkpoint(path: Path, change: Callable[[dict], None]) -> None:
    import torch

    saved = torch.load(path, weights_only=True)
    change(saved)
    torch.save(saved, path)


def flip_a_byte(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    header = record.header_offset
    name_length = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_length = int.from_bytes(data[header + 28 : header + 30], "little")
    data[header + 30 + name_length + extra_length + record.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def only_best(scratch: Path) -> None:
    """What a kill between the two renames of epoch 1 leaves: best.pth alone."""
    run_folder = finished_run(scratch)
    for name in ("checkpoint.pth", "log.jsonl", "curves.png"):
        (run_folder / name).unlink()


def resumes(folder: str = "run", name: str = "checkpoint.pth") -> Callable[[Path, Result], str | None]:
    """A check: the run in ``folder`` continues from ``name`` for one more epoch."""

    def check(scratch: Path, result: Result) -> str | None:
        import torch

        path = scratch / folder / name
        latest = scratch / folder / "checkpoint.pth"
        epoch = torch.load(latest if latest.is_file() else scratch / folder / "best.pth", weights_only=True)["epoch"]
        again = run(["--resume", str(path), "--epochs", str(epoch + 1)], scratch)
        if again.code != 0:
            return f"the resume failed ({again.code}): {again.err.strip()[-300:]}"
        if list((scratch / folder).glob(".*.tmp")):
            return "temporary files left behind"
        return None

    return check


def nothing_written(folder: str = "out") -> Callable[[Path, Result], str | None]:
    def check(scratch: Path, result: Result) -> str | None:
        return f"{folder}/ was written" if (scratch / folder).exists() else None

    return check


# ------------------------------------------------------------------------------------------- the probes
def bad(name: str, argv: list[str], problem: tuple[str, ...], fix: tuple[str, ...] = (), **kwargs) -> Probe:
    return Probe(name, lambda scratch: argv, 2, problem, fix, **kwargs)


def probes() -> list[Probe]:
    out = ["--output-dir", "out"]
    found: list[Probe] = [
        bad("unknown model", ["--model", "resnet51"], ("unknown model 'resnet51'",), ("choose",)),
        bad("unknown optimizer", ["--optimizer", "lamb"], ("invalid choice: 'lamb'",), ("choose from",)),
        bad("batch size 0", ["--batch-size", "0"], ("must be an integer > 0",)),
        bad("epochs 0", ["--epochs", "0"], ("must be an integer > 0",)),
        bad("lr nan", ["--lr", "nan"], ("must be > 0",)),
        bad("tau-min above tau-max", ["--tau-min", "4", "--tau-max", "3"], ("--tau-min 4 is above --tau-max 3",)),
        bad("momentum of 1", ["--momentum", "1"], ("'1' must be in [0, 1)",)),
        bad("nag without momentum", ["--optimizer", "nag", "--momentum", "0"], ("needs --momentum > 0",)),
        bad("bb option for adam", ["--optimizer", "adam", "--tau0", "2"], ("apply to --optimizer bb only",)),
        bad("device foo", ["--device", "foo"], ("'foo' is not a device",), ("use cpu, cuda",)),
        bad("device cuda without one", ["--device", "cuda"], ("CUDA is not available",), ("--device cpu",)),
        bad("image size for mnist", ["--image-size", "32"], ("MNIST images are 28x28",)),
        bad("dropout for lenet", ["--model", "lenet", "--dropout", "0.1"], ("applies to --model mlp only",)),
        bad("auto-resume without output", ["--auto-resume"], ("--auto-resume",), ("pass --output-dir",)),
        bad(
            "data missing", ["--data", "missing", *out], ("does not exist",), ("pass --data",), check=nothing_written()
        ),
        Probe(
            "data is a file",
            lambda s: ["--data", str(s / "file"), *out],
            2,
            ("is a file, not a folder",),
            ("pass a folder",),
            setup=lambda s: (s / "file").write_text("x"),
        ),
        Probe(
            "data folder empty",
            lambda s: ["--data", str(s / "data"), *out],
            2,
            ("is empty",),
            ("needs train/ and val/",),
            setup=lambda s: (s / "data").mkdir(),
            check=nothing_written(),
        ),
        Probe(
            "data without val",
            lambda s: ["--data", str(s / "data"), *out],
            2,
            ("has no val/ sub-folder",),
            ("train/<class>/<image>",),
            setup=lambda s: (image_folder(s / "data"), shutil.rmtree(s / "data" / "val")),
            check=nothing_written(),
        ),
        Probe(
            "classes differ",
            lambda s: ["--data", str(s / "data"), *out],
            2,
            ("different classes",),
            ("same class folders",),
            setup=lambda s: (image_folder(s / "data"), (s / "data" / "val" / "c1").rename(s / "data" / "val" / "x")),
        ),
        Probe(
            "class without images",
            lambda s: ["--data", str(s / "data"), "--workers", "0", *out],
            2,
            ("holds no image",),
            ("needs at least one image",),
            setup=lambda s: (image_folder(s / "data"), [p.unlink() for p in (s / "data" / "val" / "c1").iterdir()]),
            check=nothing_written(),
        ),
        Probe(
            "symlink loop in a class",
            lambda s: ["--data", str(s / "data"), "--model", "mlp", "--image-size", "12", "--workers", "0", *out],
            2,
            ("is a link to",),
            ("remove the link",),
            setup=lambda s: (image_folder(s / "data"), (s / "data" / "train" / "c0" / "loop").symlink_to(".")),
            check=nothing_written(),
        ),
        Probe(
            "class is a link into the tree",
            lambda s: ["--data", str(s / "data"), "--model", "mlp", "--image-size", "12", "--workers", "0", *out],
            2,
            ("is a link to",),
            ("remove the link",),
            setup=lambda s: (
                image_folder(s / "data"),
                (s / "data" / "train" / "c9").symlink_to("."),
                (s / "data" / "val" / "c9").symlink_to("."),
            ),
        ),
        Probe(
            "batch larger than the folder",
            lambda s: (
                ["--data", str(s / "data"), "--model", "mlp", "--image-size", "12", "--workers", "0"]
                + ["--batch-size", "64", *out]
            ),
            2,
            ("gives no full training batch",),
            ("lower --batch-size",),
            setup=lambda s: image_folder(s / "data"),
        ),
        Probe(
            "corrupt image",
            lambda s: (
                ["--data", str(s / "data"), "--model", "mlp", "--image-size", "12", "--workers", "0"]
                + ["--batch-size", "2", "--epochs", "1"]
            ),
            2,
            ("bad.png is not a readable image",),
            ("remove it",),
            setup=lambda s: (image_folder(s / "data"), (s / "data" / "train" / "c0" / "bad.png").write_bytes(b"no")),
        ),
        Probe(
            "output dir is a file",
            lambda s: ["--output-dir", str(s / "file")],
            2,
            ("is a file",),
            ("pass a folder",),
            setup=lambda s: (s / "file").write_text("keep"),
            check=lambda s, r: None if (s / "file").read_text() == "keep" else "the file was changed",
        ),
        Probe(
            "output dir under a file",
            lambda s: ["--output-dir", str(s / "file" / "run")],
            2,
            ("cannot be created",),
            setup=lambda s: (s / "file").write_text("keep"),
        ),
        Probe(
            "output dir holds a run",
            lambda s: [*TINY, "--output-dir", str(s / "run")],
            2,
            ("already holds a run",),
            ("--resume",),
            setup=finished_run,
        ),
        Probe("resume missing", lambda s: ["--resume", str(s / "none.pth")], 2, ("no such file",), ("pass the",)),
        Probe("resume a folder", lambda s: ["--resume", str(s)], 2, ("is a folder",), ("--resume",)),
        Probe(
            "resume junk",
            lambda s: ["--resume", str(s / "junk.pth")],
            2,
            ("not a readable checkpoint",),
            setup=lambda s: (s / "junk.pth").write_bytes(b"junk"),
        ),
        Probe(
            "resume damaged",
            lambda s: ["--resume", str(s / "run" / "checkpoint.pth"), "--epochs", "2"],
            2,
            ("is damaged",),
            ("resume from another copy",),
            setup=lambda s: flip_a_byte(finished_run(s) / "checkpoint.pth"),
        ),
        Probe(
            "resume version 99",
            lambda s: ["--resume", str(s / "run" / "checkpoint.pth"), "--epochs", "2"],
            2,
            ("version 99",),
            ("upgrade bbfused",),
            setup=lambda s: edit_checkpoint(finished_run(s) / "checkpoint.pth", lambda c: c.update(version=99)),
        ),
        Probe(
            "resume with optimizer state gone",
            lambda s: ["--resume", str(s / "run" / "checkpoint.pth"), "--epochs", "2"],
            2,
            ("optimizer state does not fit",),
            setup=lambda s: edit_checkpoint(finished_run(s) / "checkpoint.pth", lambda c: c.update(optimizer={})),
        ),
        Probe(
            "resume changing lr",
            lambda s: ["--resume", str(s / "run" / "checkpoint.pth"), "--epochs", "2", "--lr", "0.01"],
            2,
            ("would be ignored",),
            ("leave it out", "start a new run"),
            setup=finished_run,
        ),
        Probe(
            "resume another model",
            lambda s: ["--resume", str(s / "run" / "checkpoint.pth"), "--epochs", "2", "--model", "lenet"],
            2,
            ("is a checkpoint of --model mlp",),
            ("resume with --model mlp",),
            setup=finished_run,
        ),
        Probe(
            "resume already trained",
            lambda s: ["--resume", str(s / "run" / "checkpoint.pth")],
            2,
            ("has already trained",),
            ("--epochs above",),
            setup=lambda s: edit_checkpoint(finished_run(s) / "checkpoint.pth", lambda c: c["args"].update(epochs=1)),
        ),
        Probe(
            "resume other steps per epoch",
            lambda s: ["--resume", str(s / "run" / "checkpoint.pth"), "--epochs", "2", "--limit-train", "512"],
            2,
            ("steps per epoch",),
            ("--batch-size and --limit-train",),
            setup=finished_run,
        ),
        Probe(
            "resume best.pth in its own folder",
            lambda s: ["--resume", str(s / "run" / "best.pth"), "--epochs", "2"],
            2,
            ("overwrite its checkpoint.pth",),
            ("--output-dir NEW",),
            setup=finished_run,
        ),
        Probe(
            "only best.pth left by a kill",
            lambda s: ["--resume", str(s / "run" / "checkpoint.pth"), "--epochs", "2"],
            0,
            ("continuing from",),
            setup=only_best,
        ),
        Probe(
            "stale temporaries",
            lambda s: ["--resume", str(s / "run" / "checkpoint.pth"), "--epochs", "2"],
            0,
            ("epoch 2/2",),
            setup=lambda s: (finished_run(s) / ".checkpoint.pth.99999.tmp").write_bytes(b"half"),
            check=lambda s, r: "temporary files left behind" if list((s / "run").glob(".*.tmp")) else None,
        ),
        Probe(
            "auto-resume of a complete run",
            lambda s: [*TINY, "--epochs", "1", "--auto-resume", "--output-dir", str(s / "run")],
            0,
            ("nothing to do",),
            setup=finished_run,
        ),
        Probe(
            "Ctrl-C after an epoch",
            lambda s: [*TINY, "--epochs", "1000", "--output-dir", str(s / "run")],
            130,
            ("interrupted;", "holds epoch"),
            ("continue with", "--resume"),
            stop=(signal.SIGINT, "epoch 1/1000"),
            check=resumes(),
        ),
        Probe(
            "SIGTERM after an epoch",
            lambda s: [*TINY, "--epochs", "1000", "--output-dir", str(s / "run")],
            143,
            ("terminated (SIGTERM)", "holds epoch"),
            (f"continue with {sys.executable} -m bbfused.train --resume",),
            stop=(signal.SIGTERM, "epoch 1/1000"),
            check=resumes(),
        ),
        Probe(
            "SIGTERM while preparing",
            lambda s: [*TINY, "--epochs", "3", "--output-dir", str(s / "run")],
            143,
            ("terminated (SIGTERM) before training started",),
            ("nothing was written",),
            stop=(signal.SIGTERM, ""),
            check=lambda s, r: "files were written" if list((s / "run").glob("*")) else None,
        ),
        Probe(
            "SIGKILL after an epoch",
            lambda s: [*TINY, "--epochs", "1000", "--output-dir", str(s / "run")],
            -signal.SIGKILL,
            (),
            stop=(signal.SIGKILL, "epoch 1/1000"),
            check=resumes(),
        ),
        Probe(
            "absurd rate, paper's BB",
            lambda s: [*TINY, "--epochs", "1", "--no-bb-safeguard", "--lr", "1e30", "--output-dir", str(s / "run")],
            0,
            ("train loss nan",),
            check=lambda s, r: None if '"train_loss": null' in (s / "run" / "log.jsonl").read_text() else "log",
        ),
        Probe(
            "absurd rate, rate control",
            lambda s: [*TINY, "--epochs", "2", "--lr", "1e30"],
            0,
            ("rolled the epoch back to a good point earlier in it",),
        ),
    ]
    return found


def concurrent_runs(scratch: Path) -> tuple[str, str]:
    """The issue's reproduction: two seeds started at once on one folder."""
    folder = scratch / "D"
    processes = [
        subprocess.Popen(
            command([*TINY, "--model", "lenet", "--epochs", "2", "--seed", str(seed), "--output-dir", str(folder)]),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (0, 1)
    ]
    results = [(p, *p.communicate(timeout=TIMEOUT)) for p in processes]
    codes = sorted(p.returncode for p, _, _ in results)
    if codes != [0, 2]:
        return "failed", f"exit codes {codes}"
    winner = next(p for p, _, _ in results if p.returncode == 0)
    _, _, refused_err = next(r for r in results if r[0].returncode == 2)
    if f"(pid {winner.pid})" not in refused_err:
        return "weak", "the refusal does not name the holder's pid"
    import torch

    latest, best = (torch.load(folder / n, weights_only=True)["args"]["seed"] for n in ("checkpoint.pth", "best.pth"))
    if latest != best:
        return "failed", f"checkpoint.pth of seed {latest} beside best.pth of seed {best}"
    return "handled", ""


def classify(probe: Probe, scratch: Path) -> tuple[str, str]:
    if probe.setup is not None:
        probe.setup(scratch)
    argv = probe.argv(scratch)
    if probe.stop is None:
        result = run(argv, scratch)
    elif probe.stop[1]:
        result = run_and_stop(argv, scratch, *probe.stop)
    else:  # while preparing: a fixed delay after the start, past the imports
        errors = scratch / "stderr.txt"
        with errors.open("w") as stderr_file:
            process = subprocess.Popen(command(argv), env=ENV, cwd=scratch, stdout=subprocess.PIPE, stderr=stderr_file)
        time.sleep(1.5)
        process.send_signal(probe.stop[0])
        out, _ = process.communicate(timeout=TIMEOUT)
        result = Result(process.returncode, out.decode(), errors.read_text())
    text = result.out + result.err
    if result.code is None:
        return "failed", "no end within the time limit"
    if result.code != probe.code:
        return "failed", f"exit {result.code}, expected {probe.code}: {result.err.strip()[-300:]}"
    if probe.code == 2 and "Traceback" in result.err:
        return "failed", "a traceback for bad input"
    missing = [p for p in probe.problem if p not in text]
    if missing:
        return "failed", f"the message lacks {missing}: {result.err.strip()[-300:]}"
    if probe.check is not None:
        problem = probe.check(scratch, result)
        if problem:
            return "failed", problem
    missing_fix = [f for f in probe.fix if f not in text]
    if missing_fix:
        return "weak", f"no {missing_fix} in: {result.err.strip()[-300:]}"
    return "handled", ""


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only the probes with these names")
    parser.add_argument("--json", type=Path, help="write every probe's outcome here")
    args = parser.parse_args(argv)
    chosen = [p for p in probes() if args.only is None or p.name in args.only]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="bbfused-probes-") as root:
        for index, probe in enumerate(chosen):
            scratch = Path(root) / f"{index:02d}"
            scratch.mkdir()
            verdict, detail = classify(probe, scratch)
            outcomes.append({"probe": probe.name, "outcome": verdict, "detail": detail})
            print(f"{verdict:8s} {probe.name}{f': {detail}' if detail else ''}", flush=True)
        if args.only is None or "concurrent runs" in args.only:
            scratch = Path(root) / "concurrent"
            scratch.mkdir()
            verdict, detail = concurrent_runs(scratch)
            outcomes.append({"probe": "concurrent runs", "outcome": verdict, "detail": detail})
            print(f"{verdict:8s} concurrent runs{f': {detail}' if detail else ''}", flush=True)
    counts = {kind: sum(o["outcome"] == kind for o in outcomes) for kind in ("handled", "weak", "failed")}
    print(
        f"tried {len(outcomes)}: handled well {counts['handled']}, weak message {counts['weak']}, "
        f"failed {counts['failed']}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"counts": counts, "probes": outcomes}, indent=1) + "\n")
    for base in _FINISHED:
        shutil.rmtree(base.parent, ignore_errors=True)
    return counts


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
