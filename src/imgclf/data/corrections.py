"""Reviewed fixes to the data, versioned with it: data/corrections.csv (`id,action,reason,who`; action
`relabel:<class>` or `drop`), applied by prepare to the splits once they are drawn and before the checks, so a
corrected image stays in the split it was drawn into (relabelling before the stratified draw would move
other images between splits too). `imgclf audit --accept N` writes rows from the audit's ranking; a person
may write them by hand just as well.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

FIELDS = ["id", "action", "reason", "who"]


class CorrectionsError(ValueError):
    """A corrections file this project cannot apply: the line and field are named."""


@dataclass(frozen=True)
class Correction:
    id: str
    label: Optional[int]  # the new class index; None: drop the image
    reason: str
    who: str


def read(path: Path, classes: list[str]) -> list[Correction]:
    """The corrections in `path` (none when it does not exist); a bad line is refused naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorrectionsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = csv.DictReader(io.StringIO(text))
    if rows.fieldnames is None:
        return []
    if [f.strip() for f in rows.fieldnames] != FIELDS:
        raise CorrectionsError(f"{path}: the header must be {','.join(FIELDS)}, got {','.join(rows.fieldnames)}")
    out, seen = [], {}
    for line, row in enumerate(rows, 2):
        where = f"{path}, line {line}"
        if None in row or any(v is None for v in row.values()):
            raise CorrectionsError(f"{where}: expected {len(FIELDS)} fields ({','.join(FIELDS)})")
        sample, action = row["id"].strip(), row["action"].strip()
        if not sample:
            raise CorrectionsError(f"{where}: id is empty")
        if sample in seen:
            raise CorrectionsError(f"{where}: id {sample!r} is corrected twice (first on line {seen[sample]})")
        seen[sample] = line
        if action == "drop":
            label = None
        elif action.startswith("relabel:") and action[len("relabel:"):] in classes:
            label = classes.index(action[len("relabel:"):])
        else:
            raise CorrectionsError(f"{where}: action {action!r}: use drop or relabel:<class>, a class of "
                                   f"{', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}")
        out.append(Correction(sample, label, row["reason"].strip(), row["who"].strip()))
    return out


def apply(splits: dict, corrections: list[Correction]) -> tuple[dict, dict]:
    """The splits with `corrections` applied (each split's images stay in it), and the counts for meta.json:
    relabelled, dropped, and absent (ids in no split: a quick run's subset, or a typo; listed)."""
    wanted = {c.id: c for c in corrections}
    out, relabelled, dropped, found = {}, 0, 0, set()
    for name, ds in splits.items():
        hit = np.array([i in wanted for i in ds.ids.tolist()], dtype=bool)
        if not hit.any():
            out[name] = ds
            continue
        labels = ds.labels.copy()
        keep = np.ones(len(labels), dtype=bool)
        for n in np.flatnonzero(hit).tolist():
            c = wanted[ds.ids[n]]
            found.add(c.id)
            if c.label is None:
                keep[n] = False
                dropped += 1
            elif labels[n] != c.label:
                labels[n] = c.label
                relabelled += 1
        corrected = type(ds)(ds.images, labels, ds.ids, ds.conversions)
        out[name] = corrected.take(np.flatnonzero(keep))
    absent = sorted(set(wanted) - found)
    return out, {"rows": len(corrections), "relabelled": relabelled, "dropped": dropped, "absent": len(absent),
                 "absent_ids": absent[:20]}


def append(path: Path, rows: list[Correction], classes: list[str]) -> list[Correction]:
    """Add `rows` to the file (created with its header when missing), skipping ids it already corrects;
    written whole through a temp file. Returns the rows added."""
    from ..files import atomic_path

    path = Path(path)
    existing = read(path, classes)
    known = {c.id for c in existing}
    new = [r for r in rows if r.id not in known]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FIELDS)
    for c in [*existing, *new]:
        w.writerow([c.id, "drop" if c.label is None else f"relabel:{classes[c.label]}", c.reason, c.who])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return new
