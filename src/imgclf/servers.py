"""Commands for the servers the project starts: loopback by default, security checks left on."""

from __future__ import annotations

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
