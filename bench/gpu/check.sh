#!/usr/bin/env bash
# The GPU figures of the featurizer and of the decision overhead, as ONE prepared run for a lent
# device machine (its time is scarce): ~6 minutes on an H100/H200. Writes into ${OUT:-bench/results/gpu}
# (relative to the repository root). MiniLM is skipped: its bar is a CPU bar and its weights are
# too big to carry.
#   bash bench/gpu/check.sh            (from the repository root, with the venv of the README)
set -euo pipefail
source "$(dirname "$0")/env.sh" device.txt
"$py" -m pytest -q tests/test_metanet.py -k gpu 2>&1 | tail -3 | tee "$out/pytest-gpu.txt"
timeout 240 "$py" -m bench.featurize --device cuda --batch-sizes 64 256 1024 4096 --min-seconds 2 \
    --no-minilm --out "$out" 2>&1 | tee "$out/featurize.txt"
timeout 240 "$py" -m bench.overhead --device cuda --sizes 300 1000 --decisions 15 --out "$out" 2>&1 | tee "$out/overhead.txt"
