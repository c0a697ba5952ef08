"""DVC versioning of the raw data: `data.dvc` follows what the download stage brings, and is pushed.

Uses the `dvc` command (its Python API is internal), run as `python -m dvc` so no PATH is assumed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

from ..tracking.lineage import dvc_data_hash


class DVCError(RuntimeError):
    """A dvc command failed; the message carries its last line of output."""


def _dvc(*args: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise DVCError(f"dvc {' '.join(args)}: {lines[-1] if lines else f'exit {out.returncode}'}")
    return out.stdout


def in_dvc_repo(root: Path = Path(".")) -> bool:
    return (root / ".dvc").is_dir()


def track_raw(raw_dir: str, dvc_file: str, push: bool = True, root: Path = Path("."),
              log: Callable[[str], None] = lambda _: None) -> Optional[dict]:
    """Record the raw data in `dvc_file` (a no-op when unchanged), cache it, push it to the default remote.

    Returns None outside a DVC repository.
    """
    if not in_dvc_repo(root):
        log(f"not a DVC repository ({root.resolve()}); {dvc_file} not updated")
        return None
    before = dvc_data_hash(root / dvc_file)
    target = root / dvc_file
    if not target.is_file():  # DVC 3 has no `add --file`: name the output, let `commit` hash and cache it
        rel = (root / raw_dir).resolve().relative_to(target.parent.resolve()).as_posix()
        target.write_text(f"outs:\n- path: {rel}\n")
    _dvc("commit", "--force", "--quiet", dvc_file, cwd=root)
    after = dvc_data_hash(root / dvc_file)
    record = {"dvc_file": dvc_file, "md5": after, "changed": before != after, "pushed": False}
    if record["changed"]:
        log(f"{dvc_file}: raw data changed ({before} -> {after}); commit {dvc_file} to version it")
    if push:
        remotes = _dvc("remote", "list", cwd=root).strip()
        if remotes:
            _dvc("push", dvc_file, cwd=root)
            record["pushed"] = True
        else:
            log("no DVC remote configured; raw data not pushed (see docs/data.md: the DVC remote)")
    return record


def set_s3_remote(name: str, url: str, endpoint: str, key: str, secret: str, root: Path = Path(".")) -> None:
    """An S3 remote as the default, all of it in `.dvc/config.local` (git-ignored, mode 0600): credentials
    never in git, and never on a command line (`dvc remote modify` would show them in `ps`), so DVC's own
    config writer is called in this process."""
    import os

    from dvc.config import Config

    local = root / ".dvc" / "config.local"
    mask = os.umask(0o077)  # not readable by others, not even for a moment
    try:
        with Config(dvc_dir=str(root / ".dvc")).edit("local") as conf:
            conf["remote"][name] = {"url": url, "endpointurl": endpoint, "access_key_id": key,
                                    "secret_access_key": secret}
            conf["core"]["remote"] = name
    finally:
        os.umask(mask)
    os.chmod(local, 0o600)  # also when an older config.local was 0644


def _value(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def record_stage(cfg, stage: str, root: Path = Path("."), params_file: str = "params.yaml",
                 log: Callable[[str], None] = lambda _: None) -> bool:
    """Record a stage that ran outside `dvc repro` (the CLI, scripts/pipeline, the Prefect flow) in dvc.lock,
    as `dvc commit` does, so `dvc status` agrees with the pipeline and `dvc repro` reruns nothing it did.

    Only when the run is what dvc.yaml's command would have run: the stage's params (as dvc.yaml lists
    them) equal to `params_file`'s. Under `dvc repro` (DVC_STAGE set) DVC records the stage itself. A
    failure to record is a warning, never the stage's failure. Returns whether it was recorded.
    """
    import os

    import yaml

    from ..config import ConfigError, load

    if os.environ.get("DVC_STAGE") or not in_dvc_repo(root) or not (root / "dvc.yaml").is_file():
        return False
    try:
        spec = (yaml.safe_load((root / "dvc.yaml").read_text()).get("stages") or {}).get(stage)
        written = load(root / params_file)
    except (OSError, yaml.YAMLError, ConfigError, AttributeError) as exc:
        log(f"dvc.lock: {stage} not recorded ({exc})")
        return False
    if not isinstance(spec, dict):
        return False
    keys = [k for k in spec.get("params") or [] if isinstance(k, str)]
    ran, file = cfg.to_dict(), written.to_dict()
    differ = [k for k in keys if _value(ran, k) != _value(file, k)]
    # dvc.yaml's outs are the params file's paths: a run that wrote elsewhere (a sweep trial, a compare-models
    # variant, a worker's temp folders) made none of them and never stood for the stage: nothing to say.
    if any(ran["paths"][k] != file["paths"][k] for k in ("raw_dir", "processed_dir", "models_dir", "metrics_dir",
                                                           "reports_dir")):
        return False
    if differ:
        log(f"dvc.lock: {stage} not recorded: it ran with {', '.join(differ)} other than {params_file} says "
            "(dvc repro would rerun it)")
        return False
    try:
        _dvc("commit", "--force", "--quiet", stage, cwd=root)
    except (DVCError, OSError) as exc:
        log(f"dvc.lock: {stage} not recorded ({exc})")
        return False
    return True


def remove_remote(name: str, root: Path = Path(".")) -> None:
    if name in _dvc("remote", "list", "--local", cwd=root).split():
        _dvc("remote", "remove", "--local", name, cwd=root)
