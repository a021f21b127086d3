"""Running a script on two gloo ranks under torchrun, as the distributed tests do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TWO_RANKS = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# The end of every rank script, once its results are written.
END_OF_RANK = r"""
import os as _os
import sys as _sys
import torch.distributed as _dist

_dist.barrier()  # gloo may abort a process that tears its group down while the other is still in it
_dist.destroy_process_group()
# A rank's C++ teardown at interpreter exit may abort ("terminate called without an active exception", after
# everything above is written and the group is destroyed): end without the static destructors.
_sys.stdout.flush()
_sys.stderr.flush()
_os._exit(0)
"""


def torchrun_env(*paths: Path, **extra: str) -> dict[str, str]:
    """This environment with the checkout (and ``paths``) importable and one thread a rank."""
    path = os.pathsep.join([str(REPO), *map(str, paths), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def run_two_ranks(
    script: Path, *args: str, timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> None:
    """torchrun ``script`` with ``args`` on two processes; fails the test with the end of stderr unless both end
    well."""
    finished = subprocess.run(
        [*TWO_RANKS, str(script), *args],
        cwd=cwd,
        env=torchrun_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
