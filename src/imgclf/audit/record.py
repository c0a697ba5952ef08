"""The last audit's record (audit.json) as the gate and the model card read it: only the audit of exactly the
prepared splits in use counts, matched by their sha256s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def of_this_data(audit_dir: Path, data_sha256: dict[str, str]) -> dict[str, Any] | None:
    """audit.json when it is the audit of exactly these prepared splits (their sha256s), else None."""
    path = Path(audit_dir) / "audit.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if record.get("data_sha256") == data_sha256 else None


def shares(record: dict[str, Any]) -> tuple[float, float]:
    """(suspected label errors' share of train + validation, of test)."""
    by, n = record["label_issues_by_split"], record["images"]
    return (by["train"] + by["val"]) / max(1, n["train"] + n["val"]), by["test"] / max(1, n["test"])
