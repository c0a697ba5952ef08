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
uv sync --frozen --quiet
