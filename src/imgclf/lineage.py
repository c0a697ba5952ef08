"""Lineage tags for a run: the commit and whether the code differed from it, data hashes, params digest.

`git.dirty` counts only files a person changed: the pipeline itself rewrites DVC's
records (dvc.lock, data.dvc, the metrics files), which would otherwise mark every run
after the first as dirty. `git.modified` names the files that did make it dirty.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Optional

from .config import Config
from .tracking import redact


def _pipeline_written(path: str, cfg: Optional[Config]) -> bool:
    metrics_dir = (cfg.train.metrics_dir.rstrip("/") + "/") if cfg else "metrics/"
    return path == "dvc.lock" or path.endswith(".dvc") or path.startswith(metrics_dir)


def git_state(cwd: str | Path = ".", cfg: Optional[Config] = None) -> dict[str, str]:
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "none"}
    status = git("status", "--porcelain", "--untracked-files=no") or ""
    changed = [line[3:].split(" -> ")[-1].strip('"') for line in status.splitlines() if len(line) > 3]
    modified = [p for p in changed if not _pipeline_written(p, cfg)]
    return {"git.commit": commit, "git.dirty": str(bool(modified)).lower(),
            "git.modified": ",".join(modified)[:5000] or "none"}


def dvc_data_hash(path: str | Path = "data.dvc") -> str:
    """The md5 recorded for the raw data in data.dvc ('none' when not versioned)."""
    try:
        import yaml

        outs = yaml.safe_load(Path(path).read_text()).get("outs", [])
        return str(outs[0].get("md5", "none")) if outs else "none"
    except (OSError, AttributeError, IndexError, ValueError):
        return "none"


def lineage_tags(cfg: Config, processed_sha: dict[str, str], extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    tags = {
        **git_state(cfg=cfg),
        "data.dvc_md5": dvc_data_hash(),
        "data.processed_sha256": hashlib.sha256(json.dumps(processed_sha, sort_keys=True).encode()).hexdigest()[:16],
        **{f"data.sha256.{k}": v[:16] for k, v in processed_sha.items()},
        "params.digest": cfg.digest(),
        "model.kind": cfg.model.kind,
        "mlflow.user": getpass.getuser(),
    }
    tags.update(extra or {})
    return tags


def flat_params(cfg: Config) -> dict[str, str]:
    """Every param as MLflow wants it: strings of at most 6000 characters; URIs without secrets."""
    out = {}
    for k, v in cfg.flat().items():
        text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        if k == "tracking.uri" and v:
            text = redact(v)
        out[k] = text[:6000]
    return out
