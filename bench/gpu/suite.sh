#!/usr/bin/env bash
# The whole test suite and the tutorial with the surrogate on a GPU (the device is chosen
# automatically), as ONE prepared run for a lent device machine: ~4 minutes on an H100/H200.
# Writes logs into ${OUT:-bench/results/gpu} (relative to the repository root).
#   bash bench/gpu/suite.sh            (from the repository root; wheels: see env.sh)
# PostgreSQL tests are left out (no server there). Tests that pin the CPU for exact reruns still
# run on the CPU.
set -euo pipefail
source "$(dirname "$0")/env.sh" suite-device.txt
"$py" -c "from optuna_fms.engine.device import resolve_device; print('surrogate device:', resolve_device())" | tee -a "$out/suite-device.txt"
# NOTE: xdist workers share the one GPU; each test's studies are small.
set +e
timeout 300 "$py" -m pytest -q -m "not postgres" -p no:cacheprovider -n 8 > "$out/suite-pytest-full.txt" 2>&1
echo "pytest exit $?" >> "$out/suite-pytest-full.txt"
tail -40 "$out/suite-pytest-full.txt" > "$out/suite-pytest.txt"
timeout 200 "$py" tutorials/01_finetune_model_hub.py > "$out/suite-tutorial.txt" 2>&1
echo "tutorial exit $?" >> "$out/suite-tutorial.txt"
set -e
tail -n 3 "$out/suite-pytest.txt" "$out/suite-tutorial.txt"
