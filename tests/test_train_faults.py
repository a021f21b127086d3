"""The training command under faults: kills during the checkpoint writes, a full disk, a damaged checkpoint, an
exception on one of two processes, Ctrl-C; and what the user sees (strict JSON, resume settings, the summary,
the progress bar, the GPU hint, the figure). CPU, a few seconds each."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from test_train import TINY, read_log

from bbfused.train import checkpoints, format_record, gpu_size_hint, main, outputs, parse_args
from bbfused.train import loop as train_loop

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs in the writer that raised it."""


def load(path: Path) -> dict:
    checkpoints.verify_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    assert main([*TINY, "--epochs", "1", "--output-dir", str(out)]) == 0
    return out


def copy_run(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


# ------------------------------------------------------------------------------------------- kills and disks
@pytest.mark.parametrize("kill_at", ["best.pth", "checkpoint.pth", "log.jsonl"])
@pytest.mark.parametrize("midway", [False, True], ids=["before", "midway"])
def test_kill_during_the_writes_leaves_consistent_checkpoints(one_epoch, tmp_path, monkeypatch, kill_at, midway):
    """Epoch 2 is made the best; the process dies while writing ``kill_at`` (before it starts, or halfway with
    the temporary file left behind, as a SIGKILL would). checkpoint.pth and best.pth stay readable, best.pth
    is never older than the best epoch checkpoint.pth names, and the resume cleans up and finishes."""
    run = copy_run(one_epoch, tmp_path / "run")
    saved = torch.load(run / "checkpoint.pth", weights_only=True)
    saved["best_acc1"] = -1.0  # so that epoch 2 is the best and best.pth is written
    torch.save(saved, run / "checkpoint.pth")
    original = outputs.atomic_write

    calls = {kill_at: 0}
    # The resume rewrites the log once before training: the kill comes at epoch 2's write.
    fatal_call = 2 if kill_at == "log.jsonl" else 1

    def dying_write(path: Path, write) -> None:
        calls[kill_at] += path.name == kill_at
        if path.name == kill_at and calls[kill_at] == fatal_call:
            if midway:
                path.with_name(f".{path.name}.tmp").write_bytes(b"half a file")
            raise Killed
        original(path, write)

    monkeypatch.setattr(outputs, "atomic_write", dying_write)  # the log and the figure
    monkeypatch.setattr(checkpoints, "atomic_write", dying_write)
    with pytest.raises(Killed):
        main([*TINY, "--epochs", "2", "--resume", str(run / "checkpoint.pth")])
    monkeypatch.undo()

    latest, best = load(run / "checkpoint.pth"), load(run / "best.pth")
    assert best["epoch"] >= latest["best_epoch"]
    assert best["best_acc1"] >= latest["best_acc1"]
    assert latest["epoch"] == (1 if kill_at != "log.jsonl" else 2)
    assert main([*TINY, "--epochs", "3", "--resume", str(run / "checkpoint.pth")]) == 0
    assert not list(run.glob(".*.tmp"))
    assert [r["epoch"] for r in read_log(run)] == [1, 2, 3]


def test_too_little_free_space_stops_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: argparse.Namespace(free=1000))
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "free" in err and "checkpoints of this run need about" in err and "--output-dir" in err
    assert not out.exists() or not any(out.iterdir())


def test_disk_full_while_writing_exits_2_and_keeps_the_last_checkpoint(one_epoch, tmp_path, monkeypatch, capsys):
    """torch.save on a full disk: part of the file, then its zip writer's RuntimeError."""
    run = copy_run(one_epoch, tmp_path / "run")
    before = (run / "checkpoint.pth").read_bytes()

    def full_disk_save(obj, path) -> None:
        Path(path).write_bytes(b"\0" * 64)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(outputs.torch, "save", full_disk_save)
    assert main([*TINY, "--epochs", "2", "--resume", str(run / "checkpoint.pth")]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "is full" in err and "free some space" in err and f"--resume {run / 'checkpoint.pth'}" in err
    assert not list(run.glob(".*.tmp"))
    assert (run / "checkpoint.pth").read_bytes() == before
    assert main([*TINY, "--epochs", "2", "--resume", str(run / "checkpoint.pth")]) == 0


def test_damaged_checkpoint_is_refused(one_epoch, tmp_path, capsys):
    """One flipped byte in a tensor's data: torch.load alone would read it silently."""
    run = copy_run(one_epoch, tmp_path / "run")
    path = run / "checkpoint.pth"
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)  # the largest tensor
    data = bytearray(path.read_bytes())
    header = record.header_offset
    name_length = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_length = int.from_bytes(data[header + 28 : header + 30], "little")
    offset = header + 30 + name_length + extra_length + record.file_size // 2
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    assert main([*TINY, "--epochs", "2", "--resume", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and record.filename in err
    assert [r["epoch"] for r in read_log(run)] == [1]  # nothing rewritten


# ------------------------------------------------------------------------------------------- processes
def test_exception_on_one_of_two_processes_ends_both(tmp_path):
    """A corrupt image in the folder: the process that reads it fails, aborts the process group, and the
    other process's pending all-reduce fails at once; the job ends within seconds with the traceback."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for index in range(2):
        for split, count in (("train", 8), ("val", 2)):
            folder = tmp_path / "data" / split / f"class{index}"
            folder.mkdir(parents=True)
            for n in range(count):
                pixels = torch.randint(0, 256, (16, 16, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{n}.png")
    (tmp_path / "data" / "train" / "class1" / "corrupt.png").write_bytes(b"not an image")
    argv = ["--data", str(tmp_path / "data"), "--model", "mlp", "--image-size", "16", "--workers", "0"]
    argv += ["--batch-size", "2", "--epochs", "3", "--bb-backend", "eager", "--device", "cpu"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "bbfused.train", *argv]
    start = time.monotonic()
    finished = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    assert finished.returncode != 0
    assert "failed:" in finished.stderr and "corrupt.png" in finished.stderr, finished.stderr[-3000:]
    assert elapsed < 120


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "bbfused.train", *TINY, "--epochs", "1000", "--output-dir", str(out)]
    errors = tmp_path / "stderr.txt"  # a file, not a pipe: the progress bar must never block on a full pipe
    with errors.open("w") as stderr_file:
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=stderr_file, text=True)
        try:
            for line in process.stdout:  # wait for the first epoch's line: checkpoint.pth holds epoch 1 or more
                if line.split()[:2] == ["epoch", "1/1000"]:
                    break
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=60)
        finally:
            process.kill()
    stderr = errors.read_text()
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert f"--resume {out / 'checkpoint.pth'}" in stderr and "holds epoch" in stderr
    saved = load(out / "checkpoint.pth")
    assert f"holds epoch {saved['epoch']}" in stderr
    assert not list(out.glob(".*.tmp"))
    assert main(["--resume", str(out / "checkpoint.pth"), "--epochs", str(saved["epoch"] + 1)]) == 0


def test_sigterm_to_the_process_group_with_loader_workers_exits_cleanly(tmp_path):
    """Slurm's scancel and Kubernetes signal every process of the job: the loader workers get SIGTERM too. They exit
    quietly, so the run saves, says how to resume, exits 143 with no traceback about dead workers, and does not hang
    on them."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 24), ("val", 4)):
        for name in ("a", "b"):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for n in range(count):
                pixels = torch.randint(0, 256, (16, 16, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{n}.png")
    out = tmp_path / "run"
    argv = ["--data", str(tmp_path / "data"), "--model", "mlp", "--image-size", "16", "--workers", "2"]
    argv += ["--batch-size", "2", "--epochs", "1000", "--bb-backend", "eager", "--device", "cpu"]
    command = [sys.executable, "-m", "bbfused.train", *argv, "--output-dir", str(out)]
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr_file:
        process = subprocess.Popen(
            command, env=ENV, stdout=subprocess.PIPE, stderr=stderr_file, text=True, start_new_session=True
        )
        try:
            wait_for_line(process, "epoch 1/1000")  # checkpoint.pth holds epoch 1; epoch 2's workers are running
            os.killpg(process.pid, signal.SIGTERM)
            process.communicate(timeout=60)
        finally:
            process.kill()
    stderr = errors.read_text()
    assert process.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr and "Exception ignored" not in stderr
    assert f"--resume {out / 'checkpoint.pth'}" in stderr


# ------------------------------------------------------------------------------------------- runs sharing a folder
def start_run(argv: list[str], stderr: Path) -> subprocess.Popen:
    """The command in its own process; stderr goes to a file, never a pipe the progress bar could fill."""
    with stderr.open("w") as stderr_file:
        command = [sys.executable, "-m", "bbfused.train", *argv]
        return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=stderr_file, text=True)


def wait_for_line(process: subprocess.Popen, starts: str) -> str:
    for line in process.stdout:
        if " ".join(line.split()).startswith(starts):
            return line
    raise AssertionError(f"the run ended (exit {process.wait()}) before printing a line starting {starts!r}")


def test_second_run_on_one_folder_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, capsys):
    """Two runs on one --output-dir overwrote each other's files. The second is refused at once, naming the
    first's pid, even before the first wrote anything; after a SIGKILL its lock is stale and taken over, and
    the temporary files of killed processes are removed."""
    out = tmp_path / "run"
    first = start_run([*TINY, "--epochs", "1000", "--output-dir", str(out)], tmp_path / "first.txt")
    try:
        wait_for_line(first, "mlp on MNIST")  # prepared: it holds the folder, nothing is written yet
        assert main([*TINY, "--epochs", "2", "--seed", "1", "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--output-dir {out} is in use by another bbfused-train run (pid {first.pid})" in err
        assert f"kill {first.pid}" in err and "choose another --output-dir" in err
        wait_for_line(first, "epoch 1/1000")
        assert main(["--resume", str(out / "checkpoint.pth"), "--epochs", "1001"]) == 2
        assert f"(pid {first.pid})" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait(timeout=60)
    assert (out / ".bbfused-train.lock").read_text().split()[0] == str(first.pid)  # left behind by the kill
    (out / ".curves.png.4194304.tmp").write_bytes(b"half a figure")  # another killed process's
    saved = load(out / "checkpoint.pth")["epoch"]
    assert main(["--resume", str(out / "checkpoint.pth"), "--epochs", str(saved + 1)]) == 0
    printed = capsys.readouterr().out
    assert f"the run of pid {first.pid}" in printed and "ended without releasing its lock" in printed
    assert not list(out.glob(".*.tmp")) and not (out / ".bbfused-train.lock").exists()
    assert [r["epoch"] for r in read_log(out)][-1] == saved + 1


def test_held_lock_refuses_before_anything_is_written(tmp_path, capsys):
    """A lock held in this process (another open file): refused at once, and a folder the refused run created
    is removed again."""
    from bbfused.train.lock import lock_output_dir

    held = lock_output_dir(tmp_path / "run")
    try:
        assert main([*TINY, "--epochs", "1", "--output-dir", str(tmp_path / "run")]) == 2
        assert f"(pid {os.getpid()})" in capsys.readouterr().err
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".bbfused-train.lock"]
    finally:
        held.release(remove_created=True)
    assert not (tmp_path / "run").exists()
    assert main([*TINY, "--epochs", "1", "--output-dir", str(tmp_path / "new" / "run"), "--data", "nowhere"]) == 2
    assert not (tmp_path / "new").exists()  # created for the lock, removed with it


def test_without_flock_a_dead_owner_is_stale_and_a_live_one_holds(tmp_path, monkeypatch):
    """On a file system without flock the lock file's pid decides: a process that is gone has no lock."""
    import fcntl
    import socket

    from bbfused.train import UsageError
    from bbfused.train.lock import LOCK, lock_output_dir

    def no_flock(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / LOCK).write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")
    lock = lock_output_dir(folder)
    assert lock.stale_owner == (int(dead.stdout), socket.gethostname())
    assert (folder / LOCK).read_text().split()[0] == str(os.getpid())
    lock.release()
    (folder / LOCK).write_text(f"{os.getppid()} {socket.gethostname()}\n")  # alive: the test runner's parent
    with pytest.raises(UsageError, match=f"in use by another bbfused-train run \\(pid {os.getppid()}\\)"):
        lock_output_dir(folder)


def test_an_unreadable_checkpoint_names_the_runs_other_one(one_epoch, tmp_path, capsys):
    """A truncated checkpoint.pth: the refusal says where else the run can continue from (its best.pth)."""
    run = copy_run(one_epoch, tmp_path / "run")
    whole = (run / "checkpoint.pth").read_bytes()
    (run / "checkpoint.pth").write_bytes(whole[: len(whole) // 2])
    assert main(["--resume", str(run / "checkpoint.pth"), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "is not a readable checkpoint" in err
    assert f"resume from another copy, or from {run / 'best.pth'}, or start a new run" in err


def test_a_folder_holding_only_curves_is_not_overwritten(tmp_path, capsys):
    """A curves.png alone (a run's figure kept, or the user's own) is a previous run's output too: refused, named."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "curves.png").write_bytes(b"a figure someone kept")
    err = run_bad_output([*TINY, "--output-dir", str(run)], capsys)
    assert "already holds a run's curves.png but no checkpoint to continue it from; move it away" in err
    assert (run / "curves.png").read_bytes() == b"a figure someone kept"


# ------------------------------------------------------------------------------------------- restarting
def test_folder_with_only_best_continues_from_it(one_epoch, tmp_path, capsys):
    """A kill between the two renames of epoch 1 leaves best.pth without checkpoint.pth. The refusal to start
    over it names a command that works, and --resume D/checkpoint.pth (what a restarter runs) continues from
    best.pth, which holds the same epoch."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pth").write_bytes((one_epoch / "best.pth").read_bytes())
    (run / ".checkpoint.pth.4194304.tmp").write_bytes(b"the rename that never happened")
    err = run_bad_output([*TINY, "--epochs", "2", "--output-dir", str(run)], capsys)
    assert f"already holds a run (best.pth); continue it with --resume {run / 'best.pth'}" in err
    assert main(["--resume", str(run / "checkpoint.pth"), "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"{run / 'checkpoint.pth'} is missing" in printed and f"continuing from {run / 'best.pth'}" in printed
    assert [r["epoch"] for r in read_log(run)] == [1, 2] and load(run / "checkpoint.pth")["epoch"] == 2
    assert not list(run.glob(".*.tmp"))


def test_missing_checkpoint_beside_a_longer_log_is_not_replaced_by_best(one_epoch, tmp_path, capsys):
    """checkpoint.pth lost some other way, the log going further than best.pth: continuing from best.pth would
    drop logged epochs, so it takes the explicit command, which the message names."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pth").write_bytes((one_epoch / "best.pth").read_bytes())
    (run / "log.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))
    err = run_bad_output(["--resume", str(run / "checkpoint.pth"), "--epochs", "4"], capsys)
    assert "records epochs up to 3" in err and f"pass --resume {run / 'best.pth'}" in err
    assert (run / "log.jsonl").read_text().count("\n") == 3


def test_auto_resume_is_one_command_for_every_state(one_epoch, tmp_path, capsys):
    """--auto-resume: what a restarter (torchrun --max-restarts, a requeue) runs again unchanged. It starts a
    run in a folder a kill left without a checkpoint, continues one with best.pth only, and once the run is
    complete exits 0 instead of 2, so a restarter never loops on an error."""
    command = [*TINY, "--epochs", "2", "--auto-resume", "--output-dir"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".best.pth.4194304.tmp").write_bytes(b"killed during the first write")
    assert main([*TINY, "--epochs", "1", "--auto-resume", "--output-dir", str(fresh)]) == 0
    assert [r["epoch"] for r in read_log(fresh)] == [1] and not list(fresh.glob(".*.tmp"))

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pth").write_bytes((one_epoch / "best.pth").read_bytes())
    assert main([*command, str(run)]) == 0
    assert [r["epoch"] for r in read_log(run)] == [1, 2]
    capsys.readouterr()
    assert main([*command, str(run)]) == 0
    assert f"{run / 'checkpoint.pth'} holds all 2 epochs of this run; nothing to do" in capsys.readouterr().out
    assert [r["epoch"] for r in read_log(run)] == [1, 2]
    assert "pass --output-dir, and no --resume" in run_bad_output([*TINY, "--auto-resume"], capsys)


def run_bad_output(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_exits_143_and_names_the_command_that_started_the_run(tmp_path):
    """Schedulers and torchrun send SIGTERM on preemption: it ends the run as Ctrl-C does, and the resume line
    repeats how the run was started (here this interpreter's -m bbfused.train: bbfused-train may not be on
    PATH)."""
    out = tmp_path / "run"
    process = start_run([*TINY, "--epochs", "1000", "--output-dir", str(out)], tmp_path / "stderr.txt")
    try:
        wait_for_line(process, "epoch 1/1000")
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        process.kill()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and "terminated (SIGTERM)" in stderr
    saved = load(out / "checkpoint.pth")
    resume = f"{sys.executable} -m bbfused.train --resume {out / 'checkpoint.pth'}"
    assert f"holds epoch {saved['epoch']}: continue with {resume}" in stderr
    assert not list(out.glob(".*.tmp")) and not (out / ".bbfused-train.lock").exists()
    assert main(["--resume", str(out / "checkpoint.pth"), "--epochs", str(saved["epoch"] + 1)]) == 0


def test_sigterm_during_the_writes_is_held_until_they_are_done(tmp_path, monkeypatch, capsys):
    """The signal arrives while checkpoint.pth is being written: the epoch's files are finished first."""
    original = checkpoints.save_checkpoints

    def terminated_while_saving(out, checkpoint, improved) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        original(out, checkpoint, improved)

    monkeypatch.setattr(train_loop, "save_checkpoints", terminated_while_saving)
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "3", "--device", "cpu", "--output-dir", str(out)]) == 143
    err = capsys.readouterr().err
    assert f"terminated (SIGTERM); {out / 'checkpoint.pth'} holds epoch 1: continue with " in err
    # The device is not saved with the run: the command to continue names the one chosen.
    assert f"--resume {out / 'checkpoint.pth'} --device cpu\n" in err
    assert load(out / "checkpoint.pth")["epoch"] == 1 and [r["epoch"] for r in read_log(out)] == [1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() put the handler back


def test_sigterm_under_torchrun_stops_every_process(tmp_path):
    """torchrun passes a SIGTERM on to every process: each stops as on Ctrl-C (no traceback), and rank 0
    names the torchrun command that continues the run."""
    out = tmp_path / "run"
    argv = ["--model", "lenet", "--limit-train", "512", "--limit-test", "64", "--batch-size", "32"]
    argv += ["--bb-backend", "eager", "--device", "cpu", "--epochs", "1000", "--output-dir", str(out)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "bbfused.train", *argv]
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr_file:
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=stderr_file, text=True)
    try:
        wait_for_line(process, "epoch 1/1000")
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=90)
    finally:
        process.kill()
    stderr = errors.read_text()
    # torchrun itself ends with its SignalException's traceback; no process of the run has one.
    assert "bbfused/train" not in stderr and "failed:" not in stderr, stderr[-3000:]
    assert stderr.count("terminated (SIGTERM)") == 1, stderr[-3000:]
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2 -m bbfused.train"
    assert f"continue with {launcher} --resume {out / 'checkpoint.pth'}" in stderr, stderr[-3000:]
    assert not (out / ".bbfused-train.lock").exists()


# ------------------------------------------------------------------------------------------- what the user sees
def test_log_is_strict_json_with_null_for_non_finite_values(tmp_path):
    """The paper's BB from an absurd rate: the loss becomes NaN, which the log writes as null."""
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "1", "--no-bb-safeguard", "--lr", "1e30", "--output-dir", str(out)]) == 0

    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    text = (out / "log.jsonl").read_text()
    records = [json.loads(line, parse_constant=refuse) for line in text.splitlines()]
    assert records[0]["train_loss"] is None


def test_resume_reuses_the_saved_settings(one_epoch, tmp_path, capsys):
    """No --limit-train, --batch-size or --bb-backend on the resume: the saved run's are used, and a typed
    option that changes a saved one is named."""
    run = copy_run(one_epoch, tmp_path / "run")
    capsys.readouterr()
    assert main(["--resume", str(run / "checkpoint.pth"), "--epochs", "2", "--print-freq", "7"]) == 0
    printed = capsys.readouterr().out
    assert "note: resuming with --print-freq 7 (saved 50)" in printed
    assert "--epochs" in printed  # typed and changed: named too
    saved = load(run / "checkpoint.pth")["args"]
    assert saved["limit_train"] == 256 and saved["batch_size"] == 32 and saved["epochs"] == 2
    assert [r["epoch"] for r in read_log(run)] == [1, 2]


def test_checkpoint_of_another_version_is_refused(one_epoch, tmp_path, capsys):
    """A checkpoint of a format version this bbfused does not know was loaded as if it were its own."""
    run = copy_run(one_epoch, tmp_path / "run")
    saved = torch.load(run / "checkpoint.pth", weights_only=True)
    saved["version"] = 99
    torch.save(saved, run / "checkpoint.pth")
    err = run_bad_output(["--resume", str(run / "checkpoint.pth"), "--epochs", "2"], capsys)
    assert "is a version 99 bbfused-train checkpoint, and this bbfused reads version 1" in err
    assert "upgrade bbfused" in err
    assert [r["epoch"] for r in read_log(run)] == [1]


def test_synthetic_data_shows_no_accuracy(capsys, tmp_path):
    """Synthetic labels are random: 'test top-1 0.00%' read as a failure. The line says there is no test set, no
    epoch is "best" (best.pth is the last one), and the figure has no accuracy panel."""
    argv = ["--data", "synthetic", "--model", "mlp", "--image-size", "8", "--batch-size", "4", "--epochs", "2"]
    out = tmp_path / "run"
    argv += ["--limit-train", "16", "--limit-test", "4", "--bb-backend", "eager", "--device", "cpu"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    epoch_lines = [line for line in printed if line.startswith("epoch")]
    assert len(epoch_lines) == 2 and all("no test set (synthetic data)" in line for line in epoch_lines)
    assert not any("%" in line for line in printed), printed
    assert printed[-2].startswith("done: 2 epochs in ") and "best" not in printed[-2]
    assert printed[-1] == f"outputs in {out}: checkpoint.pth and best.pth (last epoch), log.jsonl, curves.png"
    assert load(out / "best.pth")["epoch"] == 2
    history = read_log(out)
    assert len(outputs.history_figure(history, "synthetic", test_set=False).axes) == 2


def test_rolled_back_epoch_line_says_which_weights_it_shows():
    """A rolled-back epoch printed 'train loss nan' and a count of skipped values; its line says the epoch was
    undone and whose weights the test figures are."""
    record = {"epoch": 4, "lr": 0.67, "train_loss": math.nan, "test_acc1": 96.7, "images_per_s": 10.0, "time_s": 1.0}
    line = format_record({**record, "rolled_back": True, "skipped_gradient_values": 221890510}, 10)
    assert "train loss nan" in line and "221890510 non-finite gradient values skipped" in line
    assert "diverged: BB rolled the epoch back to the weights of epoch 3 (the test figures are theirs)" in line
    # The default control splits the first epoch into rate periods: a rollback there returns to the end of its
    # last good period (the initial weights only when the first period diverged).
    first = format_record({**record, "epoch": 1, "rolled_back": True}, 10)
    assert "diverged: BB rolled the epoch back to a good point earlier in it (the test figures are theirs)" in first
    assert "rolled" not in format_record({**record, "rolled_back": False}, 10)


def test_closing_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "2", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    log = read_log(out)
    best = max(log, key=lambda r: r["test_acc1"])
    summary = "\n".join(printed[-3:])  # with a rolled-back epoch, a line says so between the two
    assert any(line.startswith("done: 2 epochs in ") for line in printed[-3:])
    assert f"best test top-1 {best['test_acc1']:.2f}% at epoch {best['epoch']}" in summary
    assert f"outputs in {out}" in summary and f"best.pth (epoch {best['epoch']})" in summary


class QuietBar:
    """Stands in for tqdm in train_one_epoch: takes its calls and shows nothing."""

    def __init__(self, *args, **kwargs) -> None:
        self.closed = False

    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_progress_bar_shows_the_first_step(monkeypatch):
    """The bar gets its first figure after step 1, not after --print-freq steps."""
    updates = []

    class RecordingBar(QuietBar):
        def update(self, n: int) -> None:
            updates.append(n)

    monkeypatch.setattr(train_loop, "tqdm", RecordingBar)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(3, 4), torch.tensor([0, 1, 0]))] * 5
    train_loop.train_one_epoch(model, optimizer, loader, torch.device("cpu"), print_freq=50, progress=True)
    assert updates[0] == 1 and sum(updates) == 5


def test_ctrl_c_while_the_progress_bar_is_built_waits_until_it_is_whole(monkeypatch):
    """A SIGINT (or a SIGTERM, passed on as one) that lands inside tqdm's constructor is held until the bar is
    built: a half-built tqdm prints a traceback from its __del__ at exit. One during the steps closes the bar."""
    bars = []

    class Bar(QuietBar):
        def __init__(self, *args, **kwargs) -> None:
            bars.append(self)
            if len(bars) == 1:
                signal.raise_signal(signal.SIGINT)
            super().__init__()
            self.whole = True

    def interrupted_loader():
        yield torch.randn(3, 4), torch.tensor([0, 1, 0])
        raise KeyboardInterrupt

    monkeypatch.setattr(train_loop, "tqdm", Bar)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(3, 4), torch.tensor([0, 1, 0]))] * 5
    with pytest.raises(KeyboardInterrupt):
        train_loop.train_one_epoch(model, optimizer, loader, torch.device("cpu"), progress=True)
    assert len(bars) == 1 and bars[0].whole
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    class Loader:
        def __len__(self) -> int:
            return 5

        def __iter__(self):
            return interrupted_loader()

    with pytest.raises(KeyboardInterrupt):
        train_loop.train_one_epoch(model, optimizer, Loader(), torch.device("cpu"), progress=True)
    assert len(bars) == 2 and bars[1].closed


def test_gpu_sized_job_on_a_cpu_gets_a_hint():
    import torchvision

    big = torchvision.models.resnet50()
    args = parse_args(["--data", "synthetic", "--device", "cpu"])
    hint = gpu_size_hint(args, big, torch.device("cpu"))
    assert hint is not None and "GPU-sized" in hint and "--device cuda" in hint
    assert gpu_size_hint(parse_args(["--device", "cpu"]), torch.nn.Linear(784, 10), torch.device("cpu")) is None
    small = parse_args(["--data", "synthetic", "--device", "cpu", "--image-size", "32"])
    assert gpu_size_hint(small, big, torch.device("cpu")) is None


def test_figure_marks_rolled_back_epochs_and_has_integer_ticks():
    history = [
        {"epoch": 1, "lr": 0.1, "train_loss": 1.0, "test_acc1": 80.0, "rolled_back": False},
        {"epoch": 2, "lr": 0.4, "train_loss": math.nan, "test_acc1": 80.0, "rolled_back": True},
        {"epoch": 3, "lr": 0.1, "train_loss": 0.5, "test_acc1": 85.0, "rolled_back": False},
    ]
    figure = outputs.history_figure(history, "test")
    for axes in figure.axes:
        marks = [line for line in axes.get_lines() if line.get_label() == "rolled back"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [2]
        ticks = [t for t in axes.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks)


@pytest.mark.filterwarnings("error::UserWarning")
def test_figure_of_one_epoch_spans_its_value_without_a_warning():
    """After the first epoch each panel has one value; its axis gets a span around it (log panels x0.5..x2)
    instead of matplotlib's warning about identical limits."""
    history = [{"epoch": 1, "lr": 0.1, "train_loss": 2.0, "test_acc1": 50.0, "rolled_back": False}]
    lr, loss, acc = outputs.history_figure(history, "one epoch").axes
    assert lr.get_ylim() == pytest.approx((0.05, 0.2)) and loss.get_ylim() == pytest.approx((1.0, 4.0))
    assert acc.get_ylim() == pytest.approx((49.0, 51.0))


@pytest.mark.parametrize(
    "option",
    [["--lr", "0.01"], ["--weight-decay", "0"], ["--seed", "3"], ["--tau-max", "5"], ["--bb-preconditioner", "adam"]],
)
def test_resume_refuses_settings_it_would_ignore(one_epoch, tmp_path, capsys, option):
    """The checkpoint restores the optimizer state and the random numbers: a changed value would do nothing."""
    run = copy_run(one_epoch, tmp_path / "run")
    assert main(["--resume", str(run / "checkpoint.pth"), "--epochs", "2", *option]) == 2
    err = capsys.readouterr().err
    assert f"so {option[0]} " in err and "(saved " in err
    assert "would be ignored" in err and "start a new run" in err
    assert [r["epoch"] for r in read_log(run)] == [1]


def test_resume_takes_the_saved_preconditioner_typed_again(one_epoch, tmp_path):
    """Typing the value the run was saved with (the default, "none") is no change: the resume goes on."""
    run = copy_run(one_epoch, tmp_path / "run")
    assert main(["--resume", str(run / "checkpoint.pth"), "--epochs", "2", "--bb-preconditioner", "none"]) == 0
    assert [r["epoch"] for r in read_log(run)] == [1, 2]


def test_resume_from_best_in_its_own_folder_is_refused(one_epoch, tmp_path, capsys):
    """Continuing from best.pth there would overwrite checkpoint.pth's later epochs; a new folder is fine."""
    run = copy_run(one_epoch, tmp_path / "run")
    before = (run / "checkpoint.pth").read_bytes()
    assert main(["--resume", str(run / "best.pth"), "--epochs", "2"]) == 2
    assert "overwrite its checkpoint.pth" in capsys.readouterr().err
    assert (run / "checkpoint.pth").read_bytes() == before
    branch = tmp_path / "branch"
    assert main(["--resume", str(run / "best.pth"), "--epochs", "2", "--output-dir", str(branch)]) == 0
    assert [r["epoch"] for r in read_log(branch)] == [1, 2]


def test_resume_set_by_hand_is_checked_against_the_checkpoint(one_epoch, tmp_path):
    """Settings built without parse_args (args.resume set afterwards) still get the resume checks."""
    from bbfused.train import UsageError, prepare

    run = copy_run(one_epoch, tmp_path / "run")
    args = parse_args([*TINY, "--epochs", "2", "--model", "lenet"])
    args.resume, args.output_dir = run / "checkpoint.pth", run
    with pytest.raises(UsageError, match="is a checkpoint of --model mlp, but this run has --model lenet"):
        prepare(args)


def test_fault_probes_run_and_classify(capsys, monkeypatch):
    """benchmarks/trainer_probes.py (all its probes take minutes): two quick ones, through the same harness.
    (Its probes "tau-min above tau-max" and "momentum for bb" pass options the trainer now accepts, so they
    train the default run until the probe's timeout: they are not used here.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trainer_probes", REPO / "benchmarks" / "trainer_probes.py")
    probes = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "trainer_probes", probes)  # its dataclasses look themselves up there
    spec.loader.exec_module(probes)
    names = [probe.name for probe in probes.probes()]
    assert len(names) == len(set(names)) >= 40
    counts = probes.main(["--only", "unknown optimizer", "nag without momentum"])
    assert counts == {"handled": 2, "weak": 0, "failed": 0}
    assert "tried 2: handled well 2, weak message 0, failed 0" in capsys.readouterr().out
