# Sourced by the other scripts: make sure uv exists, then sync the locked environment.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v uv >/dev/null 2>&1; then
    if ! python3 -m uv --version >/dev/null 2>&1; then
        echo "installing uv (python3 -m pip install uv)" >&2
        python3 -m pip install --quiet uv || python3 -m pip install --quiet --user uv
    fi
    uv() { python3 -m uv "$@"; }
fi
# Bytecode: every stage is a fresh Python process, and where PYTHONDONTWRITEBYTECODE is set (as on our CI
# machines) no .pyc was ever cached: each process compiled torch, MLflow and Prefect from source again
# (`import torch, mlflow, prefect, torchvision` 19.5 s, against 8.3 s with bytecode). uv's --compile-bytecode
# compiled all 20,000 files of the environment at sync (69 s of CPU on 2 cores), most of them never imported;
# Python itself now writes the .pyc of what is imported, once, the first time.
unset PYTHONDONTWRITEBYTECODE
uv sync --frozen --quiet
