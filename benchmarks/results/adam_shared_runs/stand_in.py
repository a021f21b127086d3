"""The ResNet-18 stand-in of the paper's experiments (``benchmarks/paper/sensitivity.py``) with the prototype of
``adam_shared.py`` installed: the Adam-scaled mode's estimate read from its momentum buffer. Runs in this process
(``--jobs 1``: a worker process would not have the patch); the options are sensitivity.py's, the training command's
after ``--`` (give ``--bb-preconditioner adam --bb-backend eager``):

    python benchmarks/results/adam_shared_runs/stand_in.py --model resnet18 --methods bb-safe --lrs 0.001 --seeds 0 \\
        --epochs 10 --out benchmarks/results/adam_shared_runs/resnet18 \\
        -- --limit-train 10000 --limit-test 2000 --bb-preconditioner adam --bb-backend eager
"""

import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))
sys.path.insert(0, str(here.parents[1] / "paper"))
import adam_shared  # noqa: E402
import sensitivity  # noqa: E402

if __name__ == "__main__":
    if "--jobs" in sys.argv and sys.argv[sys.argv.index("--jobs") + 1] != "1":
        raise SystemExit("--jobs 1 only: a worker process would train without the prototype")
    adam_shared.install()
    sensitivity.main(sys.argv[1:])
