#!/usr/bin/env bash
# On a GPU machine that has PyTorch but not this project's .venv (no `make setup` there: no
# package index), with dmlkit imported from the checkout: the CUDA tests (pytest needed:
# kNN and retrieval metrics on CUDA against the CPU; every loss on CUDA against the CPU; the
# device crop-resize against the CPU and a bit-for-bit resume from the decoded cache;
# fit on CUDA under AMP, bit-for-bit repeat and resume, a CUDA run resumed on the CPU),
# then the CUDA rows of `make bench`. Exit status 1 if the tests failed (the rows run
# anyway).
#
#     benchmarks/gpu_session.sh                  # → $OUT/results-gpu.md, else benchmarks/
#     PYTHON=.venv/bin/python benchmarks/gpu_session.sh --gpu-dry-run   # the check, on CPU
#
# Needs torch, torchvision, numpy, scipy, scikit-learn, matplotlib, pandas, pillow, pyyaml
# and tqdm. pytorch-metric-learning gives the loss rows their reference: without it they
# time dmlkit alone. Wheels put in .whl/ (pip download … -d .whl) are installed first,
# offline. Fits one device call: on an H200 (2026-12-04) the tests took 18 s and the rows
# 121 s (181 s once the training rows used a CUB-sized epoch); the CPU grid is not run
# (`make bench`). Checked here with torch 2.11.0 / torchvision 0.26.0 (the H200
# image's versions) in a venv without the project's other packages, as a --gpu-dry-run.
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
status=0
if [ "$mode" = --gpu-only ]; then
  "$python" -m pytest -q -p no:cacheprovider -rs -k cuda \
    tests/test_evaluate.py tests/test_losses.py tests/test_train.py tests/test_input_pipeline.py \
    || status=1
fi
"$python" benchmarks/report.py "$mode" --out "$out"
exit $status
