"""Prefect's local (ephemeral) API, made safe to start from two processes at once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

# Before Prefect reads its settings: the local API's telemetry heartbeat only adds writes to a
# SQLite file that other runs share (and this machine may have no internet anyway).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The local API is a server process of its own; Prefect waits 20 s for it, which two pipelines starting at
# once on a busy 2-core machine overran ("Timed out while attempting to connect to ephemeral Prefect API").
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect.settings import get_current_settings  # noqa: E402

from imgclf.locks import file_lock  # noqa: E402


def prepare_local_api() -> None:
    """Create the local API's SQLite database under a file lock when it does not exist yet.

    Without a server (`PREFECT_API_URL` unset) every `python -m flows` starts a temporary API over
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
    with file_lock(db.with_name(db.name + ".imgclf-lock")):
        if not db.is_file() or db.stat().st_size == 0:
            from prefect.server.database import provide_database_interface

            asyncio.run(provide_database_interface().create_db())
