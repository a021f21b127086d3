#!/usr/bin/env bash
# The reference runs of the robustness suite, as recorded in benchmarks/results/robustness_runs/: one run at a
# time on one thread (the 2-core machine is shared), at low priority. Saved runs are skipped, so this resumes.
#
#   nohup benchmarks/robustness/run_references.sh > /tmp/robustness_references.log 2>&1 &
#
# About 2.5 h for the new settings and 1.5 h for the old ones (resnet18 last) on that machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
suite() { nice -n 5 "$PYTHON" benchmarks/robustness/suite.py --jobs 1 "$@"; }

# The references most users would run first, so that a sweep stopped early has them.
ORDER=sgdm-cosine,adamw-cosine,prodigy-default,dadapt-sgd-default,schedulefree-sgd-default
ORDER=$ORDER,prodigy,dadapt-sgd,schedulefree-sgd,sgdm,adam

# 1. Every reference on the six new settings.
suite --settings new --methods "$ORDER"
# 2. The references the old settings lack (sgdm, adam, prodigy, dadapt-sgd, schedulefree-sgd are saved there).
NEW_ON_OLD=sgdm-cosine,adamw-cosine,prodigy-default,dadapt-sgd-default,schedulefree-sgd-default
suite --settings mlp,lenet,bn-cnn,mlp-batch32,digits --methods "$NEW_ON_OLD"
# 3. Schedule-Free SGD's saved runs on the BatchNorm settings predate the BatchNorm recomputation its README asks
#    for before evaluation: train them again (only those without the record's "batchnorm_recomputed").
stale() {
    "$PYTHON" - "$1" <<'EOF'
import json, sys
from pathlib import Path
folder = Path("benchmarks/results/robustness_runs")
paths = sorted(folder.glob(f"{sys.argv[1]}_schedulefree-sgd_lr*.json"))
print(sum(not json.loads(p.read_text()).get("batchnorm_recomputed") for p in paths))
EOF
}
if [ "$(stale bn-cnn)" != 0 ]; then suite --settings bn-cnn --methods schedulefree-sgd --retrain; fi
# 4. ResNet-18 last: about 80 s a run.
suite --settings resnet18 --methods "$NEW_ON_OLD"
if [ "$(stale resnet18)" != 0 ]; then suite --settings resnet18 --methods schedulefree-sgd --retrain; fi
"$PYTHON" benchmarks/robustness/report.py
