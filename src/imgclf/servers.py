"""Commands for the servers the project starts: loopback by default, security checks left on."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def mlflow_server_command(store_dir: str | Path = "mlflow", host: str = "127.0.0.1", port: int = 5000,
                          allowed_hosts: list[str] | None = None, workers: int = 1) -> list[str]:
    """`mlflow server` over the embedded store (same SQLite file and artifact folder as the pipeline).

    Host-header and CORS checks stay on: only the named hosts are accepted.
    """
    store = Path(store_dir).resolve()
    store.mkdir(parents=True, exist_ok=True)
    hosts = allowed_hosts or [f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1", "localhost"]
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
        "--artifacts-destination", (store / "artifacts").as_uri(),
        "--host", host, "--port", str(port), "--workers", str(workers),
        "--allowed-hosts", ",".join(hosts),
    ]


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def prefect_server_command(host: str = "127.0.0.1", port: int = 4200,
                           environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """`prefect server start` and the environment it needs: CSRF protection on, analytics off.

    Bound to anything but loopback it must have an auth string (PREFECT_SERVER_API_AUTH_STRING,
    `user:password`); clients then set PREFECT_API_AUTH_STRING to the same value.
    """
    env = dict(environ if environ is not None else os.environ)
    if host not in LOOPBACK and not env.get("PREFECT_SERVER_API_AUTH_STRING"):
        raise ValueError(f"PREFECT_SERVER_API_AUTH_STRING: set it ('user:password') before exposing the "
                         f"Prefect server on {host}; see the README")
    env.update({"PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)], env
