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
    """Create the local API's SQLite database, with Prefect's block types registered, under a file lock when
    it does not exist yet.

    Without a server (`PREFECT_API_URL` unset) every `python -m flows` starts a temporary API over
    PREFECT_HOME/prefect.db; two starting together on a fresh home both run the migrations
    and one dies on `index ... already exists`. One creates it here; the other waits. Each temporary API
    then registers the block types at its start: two at once on a fresh database both inserted them, and one
    logged `UNIQUE constraint failed: block_schema.checksum` and `database is locked` (a loaded CI run); once
    registered here, each start finds them and writes nothing.
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
            asyncio.run(_create_and_register())


async def _create_and_register() -> None:
    from prefect.server.database import provide_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration

    database = provide_database_interface()
    await database.create_db()
    async with await database.session() as session:
        await run_block_auto_registration(session=session)
