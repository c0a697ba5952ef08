"""Prefect's local (ephemeral) API, made safe to start from two processes at once."""

from __future__ import annotations

import asyncio
import fcntl
from pathlib import Path

from prefect.settings import get_current_settings


def prepare_local_api() -> None:
    """Create the local API's SQLite database under a file lock when it does not exist yet.

    Without a server (`PREFECT_API_URL` unset) every `imgclf run` starts a temporary API over
    PREFECT_HOME/prefect.db; two starting together on a fresh home both run the migrations
    and one dies on `index ... already exists`. One creates it here; the other waits.
    """
    settings = get_current_settings()
    url = settings.server.database.connection_url
    url = url.get_secret_value() if url is not None else ""
    if settings.api.url or not url.startswith("sqlite+aiosqlite:///"):
        return
    db = Path(url[len("sqlite+aiosqlite:///"):])
    if db.is_file():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".imgclf-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not db.is_file() or db.stat().st_size == 0:
            from prefect.server.database import provide_database_interface

            asyncio.run(provide_database_interface().create_db())
