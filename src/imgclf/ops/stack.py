"""A real team stack on loopback, for tests and demos: PostgreSQL (a private cluster) and an S3-compatible
object store (SeaweedFS), with generated credentials. `imgclf stack up|env|down`.

Everything lives in one temporary folder recorded in `<state dir>/stack.json` (mode 0600, it holds
the credentials); `env` prints the variables the servers, workers and DVC need. PostgreSQL refuses
to run as root, so as root its cluster belongs to an unprivileged user (`$IMGCLF_STACK_USER`, default
nobody). On a real team the same variables point at managed PostgreSQL and S3 instead (README).
Starting each server, with its quirks (PostgreSQL refusing root, SeaweedFS's fixed default ports), is in
stack_servers.py; here are the stack's state, its safety checks before anything is stopped or deleted,
and the environment it gives.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ..files import read_json_file, write_bytes
from .stack_servers import StackError, as_pg_user, free_port, pg_bin, start_postgres, start_seaweedfs

STATE = "stack.json"


def state_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / STATE


def load(state_dir: str | Path) -> dict:
    path = state_path(state_dir)
    if not path.is_file():
        raise StackError(f"{path}: no stack here; start one with `imgclf stack up`")
    return read_json_file(path)


def up(state_dir: str | Path = ".stack") -> dict:
    """Start PostgreSQL and SeaweedFS on free loopback ports; return the state (credentials included)."""
    path = state_path(state_dir)
    if path.is_file():
        state = load(state_dir)
        if _alive(state):
            return state
        down(state_dir)  # a stack whose processes died (a reboot): start afresh
    home = Path(tempfile.mkdtemp(prefix=HOME_PREFIX, dir=Path(tempfile.gettempdir()).resolve()))
    os.chmod(home, 0o755)  # the PostgreSQL user must reach its folder inside
    state = {"home": str(home), "pg_port": free_port(), "pg_user": "imgclf",
             "pg_password": secrets.token_urlsafe(18), "s3_port": free_port(),
             "s3_access_key": "imgclf" + secrets.token_hex(6), "s3_secret_key": secrets.token_urlsafe(24),
             "weed_ports": [free_port() for _ in range(7)], "weed_pid": None}
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    try:
        start_postgres(home, state)
        start_seaweedfs(home, state)
    except BaseException:
        _stop(state)
        raise
    mask = os.umask(0o077)  # the credentials are never readable by others, not even for a moment
    try:
        write_bytes(path, json.dumps(state, indent=2).encode())
    finally:
        os.umask(mask)
    return state


def _alive(state: dict) -> bool:
    if not _ours(state.get("weed_pid"), _check_home(state)):
        return False
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", state["pg_port"])) == 0


HOME_PREFIX = "imgclf-stack-"


def _check_home(state: dict) -> Path:
    """The stack's folder as `up` made it: a direct child of the temp folder named imgclf-stack-*, owned by
    this user. A state file that names anything else (edited, or forged) is refused before any deletion."""
    home = Path(str(state.get("home", "")))
    ok = home.is_absolute() and home.parent == Path(tempfile.gettempdir()).resolve() and \
        home.name.startswith(HOME_PREFIX) and not home.is_symlink()
    if ok and home.exists():
        ok = home.is_dir() and home.stat().st_uid == os.geteuid()
    if not ok:
        raise StackError(f"stack state names {str(home)!r} as its folder, which `imgclf stack up` did not make; "
                         "refusing to stop or delete anything")
    return home


def _ours(pid: object, home: Path) -> bool:
    """Whether `pid` is still the SeaweedFS server started for `home` (a pid may have been reused, or forged)."""
    if type(pid) is not int or pid <= 1:
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"-dir={home / 's3'}".encode() in args and os.getpgid(pid) == pid


def _stop(state: dict) -> None:
    home = _check_home(state)
    if (home / "pg" / "data").is_dir():
        subprocess.run(as_pg_user([pg_bin("pg_ctl"), "-D", str(home / "pg" / "data"), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=120)
    if _ours(state.get("weed_pid"), home):
        try:
            os.killpg(state["weed_pid"], signal.SIGTERM)
            for _ in range(40):
                os.killpg(state["weed_pid"], 0)
                time.sleep(0.25)
            os.killpg(state["weed_pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(home, ignore_errors=True)


def down(state_dir: str | Path = ".stack") -> bool:
    """Stop both servers and delete their data; False when no stack was recorded here."""
    path = state_path(state_dir)
    if not path.is_file():
        return False
    _stop(read_json_file(path))
    path.unlink()
    return True


def environment(state: dict) -> dict[str, str]:
    """What the MLflow server, the Prefect server, the workers and DVC read."""
    pg = f"{state['pg_user']}:{state['pg_password']}@127.0.0.1:{state['pg_port']}"
    return {
        "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg://{pg}/mlflow",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow/artifacts",
        "IMGCLF_MLFLOW_AUTH_DATABASE_URI": f"postgresql+psycopg://{pg}/mlflow_auth",
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{state['s3_port']}",
        "AWS_ACCESS_KEY_ID": state["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": state["s3_secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{pg}/prefect",
        "IMGCLF_STUDY_STORAGE": f"postgresql+psycopg://{pg}/optuna",  # imgclf sweep's Optuna study
        "IMGCLF_DVC_REMOTE_URL": "s3://dvc/imgclf",
    }


def shell_lines(env: dict[str, str]) -> list[str]:
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
