"""The README's main job (``python -m bbfused.train``) with the dead-unit prototype of ``dead_units.py`` patched into
BB's default control; the arguments go to the training command:

    python benchmarks/results/dead_unit_runs/readme_job.py --seed 0 --output-dir OUT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dead_units import install  # noqa: E402

from bbfused.train import main  # noqa: E402

if __name__ == "__main__":
    install(0.5)
    sys.exit(main(sys.argv[1:]))
