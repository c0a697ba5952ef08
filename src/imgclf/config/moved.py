"""Keys of the old params layout (runtime and paths mixed into the result sections) and where they went.

An old-style params file or `--set` is refused with one line per moved key, so nobody's setting is
silently ignored and nobody has to guess the new spelling.
"""

from __future__ import annotations

from typing import Any

from ..schema import ConfigError

MOVED = {
    "data.link": "runtime.link",
    "data.mirrors": "runtime.download.mirrors",
    "data.download_retries": "runtime.download.retries",
    "data.download_timeout_s": "runtime.download.timeout_s",
    "data.download_deadline_s": "runtime.download.deadline_s",
    "data.download_speed_limit_bps": "runtime.download.speed_limit_bps",
    "data.download_speed_time_s": "runtime.download.speed_time_s",
    "data.download_backoff_s": "runtime.download.backoff_s",
    "data.raw_dir": "paths.raw_dir",
    "data.processed_dir": "paths.processed_dir",
    "data.dvc_file": "paths.dvc_file",
    "train.device": "runtime.device",
    "train.threads": "runtime.threads",
    "train.loader": "runtime.loader",
    "train.memory_limit_gb": "runtime.memory_limit_gb",
    "train.out_dir": "paths.models_dir",
    "train.metrics_dir": "paths.metrics_dir",
    "evaluate.batch_size": "runtime.eval_batch_size",
    "evaluate.out_dir": "paths.reports_dir",
    "register.min_accuracy": "register.min_score (with register.metric: accuracy)",
    "tracking.enabled": "runtime.tracking.enabled",
    "tracking.uri": "runtime.tracking.uri",
    "tracking.experiment": "runtime.tracking.experiment",
    "tracking.store_dir": "paths.mlflow_dir",
    "orchestration.train_pool": "runtime.orchestration.train_pool",
    "orchestration.train_timeout_s": "runtime.orchestration.train_timeout_s",
}
# model.<kind>.train (a kind's train.* values over the user's) is gone: a value written in `train` wins for
# every kind, and each kind's own defaults (imgclf.models TRAIN_DEFAULTS) fill only the keys left null there.
_KIND_TRAIN = " (a value there wins for every kind; null: the kind's default)"
_SECTIONS = {"tracking": "runtime.tracking (store_dir: paths.mlflow_dir)",
             "orchestration": "runtime.orchestration"}


def moved_keys(raw: dict, overrides: dict[str, Any]) -> list[str]:
    """One line per old-layout key in the params (file or --set): the key and where it lives now."""
    found: dict[str, str] = {}
    for section, value in raw.items():
        if section in _SECTIONS and not any(f"{section}.{k}" in MOVED for k in (value if isinstance(value, dict) else {})):
            found[section] = _SECTIONS[section]
        for key in (value if isinstance(value, dict) else {}):
            dotted = f"{section}.{key}"
            if dotted in MOVED:
                found[dotted] = MOVED[dotted]
            if section == "model" and isinstance(value[key], dict) and "train" in value[key]:
                kind_train = value[key]["train"]
                for inner in (kind_train if isinstance(kind_train, dict) else {}):
                    found[f"model.{key}.train.{inner}"] = MOVED.get(f"train.{inner}", f"train.{inner}{_KIND_TRAIN}")
                if not kind_train:
                    found[f"model.{key}.train"] = f"train{_KIND_TRAIN}"
    for dotted in overrides:
        parts = dotted.split(".")
        if dotted in MOVED:
            found[f"--set {dotted}"] = MOVED[dotted]
        elif parts[0] == "model" and len(parts) >= 3 and parts[2] == "train":
            inner = ".".join(parts[3:])
            found[f"--set {dotted}"] = MOVED.get(f"train.{inner}", f"train.{inner}{_KIND_TRAIN}") if inner \
                else f"train{_KIND_TRAIN}"
        elif dotted in _SECTIONS:
            found[f"--set {dotted}"] = _SECTIONS[dotted]
    return [f"{old}: moved to {new}" for old, new in found.items()]


def refuse_old_layout(raw: dict, overrides: dict[str, Any]) -> None:
    lines = moved_keys(raw, overrides)
    if lines:
        raise ConfigError(f"old-style params: {len(lines)} key(s) moved (runtime and paths now have sections of "
                          "their own; see params.yaml)\n  " + "\n  ".join(lines))
