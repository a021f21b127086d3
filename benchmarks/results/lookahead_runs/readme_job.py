"""The README's main job (``python -m bbfused.train``) with the look-ahead estimate of ``lookahead.py`` patched into
BB's default control; the arguments go to the training command:

    python benchmarks/results/lookahead_runs/readme_job.py --seed 0 --output-dir OUT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lookahead import install  # noqa: E402

from bbfused.train import main  # noqa: E402

if __name__ == "__main__":
    install()
    sys.exit(main(sys.argv[1:]))
