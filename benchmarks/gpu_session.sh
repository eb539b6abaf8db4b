#!/usr/bin/env bash
# The CUDA rows of `make bench` on a GPU machine that has PyTorch but not this project's
# .venv (no `make setup` there: no package index): dmlkit is imported from the checkout.
#
#     benchmarks/gpu_session.sh                  # → $OUT/results-gpu.md, else benchmarks/
#     PYTHON=.venv/bin/python benchmarks/gpu_session.sh --gpu-dry-run   # the check, on CPU
#
# Needs torch, torchvision, numpy, scipy, scikit-learn, matplotlib, pandas, pillow, pyyaml
# and tqdm. pytorch-metric-learning gives the loss rows their reference: without it they
# time dmlkit alone. Wheels put in .whl/ (pip download … -d .whl) are installed first,
# offline. Takes a few minutes on an H100/H200; the CPU grid is not run (`make bench`).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/dmlkit-site .whl/*.whl
  export PYTHONPATH=/tmp/dmlkit-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mode=${1:---gpu-only}
out=${OUT:-benchmarks}/results-gpu.md
"$python" -c 'import torch; print("torch", torch.__version__, "| CUDA:", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
"$python" benchmarks/report.py "$mode" --out "$out"
