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

from ..config import Config
from ..urls import redact


def _pipeline_written(path: str, cfg: Optional[Config]) -> bool:
    metrics_dir = (cfg.paths.metrics_dir.rstrip("/") + "/") if cfg else "metrics/"
    return path == "dvc.lock" or path.endswith(".dvc") or path.startswith(metrics_dir)


def _git(cwd: str | Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def changed_files(cwd: str | Path = ".") -> Optional[list[str]]:
    """Tracked files that differ from HEAD (None outside a repository), from `git status --porcelain -z`:
    entries are `XY path` separated by NUL, never quoted; a rename's source follows as an entry of its own.
    Stripping the text form eats the first entry's leading status space and cuts its path's first letter."""
    out = _git(cwd, "status", "--porcelain", "-z", "--untracked-files=no")
    if out is None:
        return None
    entries, paths = out.split("\0"), []
    i = 0
    while i < len(entries):
        entry = entries[i]
        if len(entry) > 3:
            paths.append(entry[3:])
            if entry[0] in "RC":  # the rename's original path comes next
                i += 1
        i += 1
    return paths


def git_state(cwd: str | Path = ".", cfg: Optional[Config] = None) -> dict[str, str]:
    commit = _git(cwd, "rev-parse", "HEAD")
    changed = changed_files(cwd)
    if commit is None or changed is None:
        return {"git.commit": "none"}
    commit = commit.strip()
    modified = [p for p in changed if not _pipeline_written(p, cfg)]
    top = (_git(cwd, "rev-parse", "--show-toplevel") or str(Path(cwd).resolve())).strip()
    remote = (_git(cwd, "remote", "get-url", "origin") or "").strip()
    branch = (_git(cwd, "rev-parse", "--abbrev-ref", "HEAD") or "").strip()
    # MLflow's own names too, so its run page fills Source and the commit.
    return {"git.commit": commit, "git.dirty": str(bool(modified)).lower(),
            "git.modified": ",".join(modified)[:5000] or "none", "mlflow.source.type": "LOCAL",
            "mlflow.source.name": redact(remote) if remote else top, "mlflow.source.git.commit": commit,
            **({"mlflow.source.git.repoURL": redact(remote)} if remote else {}),
            **({"mlflow.source.git.branch": branch} if branch and branch != "HEAD" else {})}


def dvc_data_hash(path: str | Path = "data.dvc") -> str:
    """The md5 recorded for the raw data in data.dvc ('none' when not versioned)."""
    try:
        import yaml

        outs = yaml.safe_load(Path(path).read_text()).get("outs", [])
        return str(outs[0].get("md5", "none")) if outs else "none"
    except (OSError, AttributeError, IndexError, ValueError):
        return "none"


def processed_digest(processed_sha: dict[str, str]) -> str:
    """One digest of the prepared splits (their files' sha256s): the data.processed_sha256 tag."""
    return hashlib.sha256(json.dumps(processed_sha, sort_keys=True).encode()).hexdigest()[:16]


def lineage_tags(cfg: Config, processed_sha: dict[str, str], extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    tags = {
        **git_state(cfg=cfg),
        "data.dvc_md5": dvc_data_hash(cfg.paths.dvc_file) if cfg.paths.dvc_file else "none",
        "data.processed_sha256": processed_digest(processed_sha),
        **{f"data.sha256.{k}": v[:16] for k, v in processed_sha.items()},
        "params.digest": cfg.digest(),
        "model.kind": cfg.model.kind,
        "mlflow.user": getpass.getuser(),
    }
    tags.update(extra or {})
    return tags


def flat_params(cfg: Config) -> dict[str, str]:
    """The result settings as they ran, as MLflow wants them (strings of at most 6000 characters). Keys that
    do not apply (data.path for MNIST) are left out rather than logged as "None"; runtime and paths go to
    tags (runtime.*), since they do not change the result."""
    values = {**cfg.flat(), "register.model_name": cfg.model_name}
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000]
            for k, v in values.items() if v is not None}
