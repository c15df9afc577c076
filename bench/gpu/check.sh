#!/usr/bin/env bash
# The GPU figures of the featurizer and of the decision overhead, as ONE prepared run for a lent
# device machine (its time is scarce): ~6 minutes on an H100/H200. Writes into ${OUT:-bench/results/gpu}
# (relative to the repository root).
#   bash bench/gpu/check.sh            (from the repository root, with the venv of the README)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
py=".venv/bin/python"
[ -x "$py" ] || py=python3
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$out/device.txt"
"$py" -m pytest -q tests/test_metanet.py -k gpu 2>&1 | tail -3 | tee "$out/pytest-gpu.txt"
timeout 240 "$py" -m bench.featurize --device cuda --batch-sizes 64 256 1024 4096 --min-seconds 2 \
    --out "$out" 2>&1 | tee "$out/featurize.txt"
timeout 240 "$py" -m bench.overhead --device cuda --sizes 300 1000 --decisions 15 --out "$out" 2>&1 | tee "$out/overhead.txt"
