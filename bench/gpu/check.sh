#!/usr/bin/env bash
# The GPU figures of the featurizer and of the decision overhead, as ONE prepared run for a lent
# device machine (its time is scarce): ~6 minutes on an H100/H200. Writes into ${OUT:-bench/results/gpu}
# (relative to the repository root). MiniLM is skipped: its bar is a CPU bar and its weights are
# too big to carry.
#   bash bench/gpu/check.sh            (from the repository root, with the venv of the README)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
py=".venv/bin/python"
[ -x "$py" ] || py=python3
# NOTE: a lent machine has torch, PyG and gpytorch but not optuna: carry its wheels in .whl, made
# beforehand with (Python 3.12 there):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform any -d .whl optuna==5.0.0 alembic==1.20.1 \
#     colorlog==6.12.0 Mako==1.4.3 SQLAlchemy==2.1.9
# and they are installed into .whl-site (both folders are git-ignored).
if ! "$py" -c "import optuna" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .whl-site .whl/*.whl
    export PYTHONPATH="$PWD/.whl-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$out/device.txt"
"$py" -m pytest -q tests/test_metanet.py -k gpu 2>&1 | tail -3 | tee "$out/pytest-gpu.txt"
timeout 240 "$py" -m bench.featurize --device cuda --batch-sizes 64 256 1024 4096 --min-seconds 2 \
    --no-minilm --out "$out" 2>&1 | tee "$out/featurize.txt"
timeout 240 "$py" -m bench.overhead --device cuda --sizes 300 1000 --decisions 15 --out "$out" 2>&1 | tee "$out/overhead.txt"
