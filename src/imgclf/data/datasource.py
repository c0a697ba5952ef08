"""The data-source interface and its registry: code that depends on which kind of data set is configured
asks the source, and never compares source names.

A source knows the config rules it adds (`check`), its training recipe, how its raw data gets into
`<paths.raw_dir>/<name>` (`fetch`: the MNIST family downloads from mirrors and checks checksums, an
ImageFolder is snapshotted), how its splits are loaded (`load`: the official train and test sets, or one
folder that prepare splits), and where prepared data came from (`origin`, checked by `check_origin`).
Adding a source is one class and one registry entry. Importing this module does not import torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from ..schema import ConfigError
from .sources import DEFAULT_RECIPE, SOURCES, IdxSource, Recipe

if TYPE_CHECKING:
    from ..config import Config, DataConfig
    from ..progress import Progress
    from .splits import Dataset

Log = Callable[[str], None]


class DataSource(Protocol):
    name: str
    recipe: Recipe  # the train.* values params leave null
    mirrors: tuple[str, ...]  # where fetch downloads from, unless mirrors are given
    takes_link: bool  # whether runtime.link means anything for it

    def check(self, data: "DataConfig", key: str) -> None: ...
    def default_model_name(self, data: "DataConfig") -> str: ...
    def fetch(self, cfg: "Config", dest: Path, mirrors: list[str], info: Log, warn: Log,
              progress: Optional["Progress"]) -> dict: ...
    def load(self, data: "DataConfig", folder: Path, progress: Optional["Progress"]
             ) -> tuple["Dataset", Optional["Dataset"], list[str]]: ...
    def origin(self, data: "DataConfig", folder: Path) -> dict: ...
    def check_origin(self, meta_path: Path, origin: dict, data: "DataConfig") -> None: ...


@dataclass(frozen=True)
class MnistFamily:
    """A torchvision MNIST-family data set: fixed 28x28 grey images, official train/test files and classes."""

    spec: IdxSource
    takes_link = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def recipe(self) -> Recipe:
        return self.spec.recipe

    @property
    def mirrors(self) -> tuple[str, ...]:
        return self.spec.mirrors

    def check(self, data: "DataConfig", key: str) -> None:
        if (data.image_size, data.channels) != (28, 1):
            raise ConfigError(f"{key}.image_size/{key}.channels: {self.name} is 28x28 grey, got "
                              f"{data.image_size}x{data.image_size} with {data.channels} channel(s)")
        if data.classes is not None:
            raise ConfigError(f"{key}.classes: only for imagefolder ({self.name} has its official class order)")
        if data.path is not None:
            raise ConfigError(f"{key}.path: only for imagefolder; {key}.source is {self.name}, which would ignore "
                              f"it (set {key}.source: imagefolder to train on that folder)")

    def default_model_name(self, data: "DataConfig") -> str:
        return f"imgclf-{self.name}"

    def fetch(self, cfg: "Config", dest: Path, mirrors: list[str], info: Log, warn: Log,
              progress: Optional["Progress"]) -> dict:
        from .mnist_family import download_source

        d = cfg.runtime.download
        results = download_source(dest, self.spec, mirrors, retries=d.retries, timeout=d.timeout_s,
                                  deadline_s=d.deadline_s, backoff_s=d.backoff_s, speed_limit_bps=d.speed_limit_bps,
                                  speed_time_s=d.speed_time_s, log=warn, progress=progress)
        for r in results:
            info(f"{r.name}: {r.bytes} bytes " + ("already present, verified" if r.mirror is None else f"from {r.mirror}"))
        return {"source": self.name, "files": [r.name for r in results],
                "fetched": [r.name for r in results if r.mirror is not None]}

    def load(self, data: "DataConfig", folder: Path, progress: Optional["Progress"] = None):
        from .splits import load_idx_source

        return load_idx_source(folder, self.spec)

    def origin(self, data: "DataConfig", folder: Path) -> dict:
        return {"path": None, "source": self.name}

    def check_origin(self, meta_path: Path, origin: dict, data: "DataConfig") -> None:
        pass  # the source name, checked by the caller, is the whole identity


@dataclass(frozen=True)
class ImageFolderSource:
    """Any folder with one sub-folder of images per class (torchvision's ImageFolder layout)."""

    name: str = "imagefolder"
    recipe: Recipe = DEFAULT_RECIPE  # small shifts; mirroring only when asked for (text, arrows...)
    mirrors: tuple[str, ...] = ()
    takes_link = True

    def check(self, data: "DataConfig", key: str) -> None:
        if not data.path:
            raise ConfigError(f"{key}.path: required when {key}.source is imagefolder")
        if data.val_fraction + data.test_fraction >= 1:
            raise ConfigError(f"{key}.test_fraction: test_fraction + val_fraction must be < 1, got "
                              f"{data.test_fraction} + {data.val_fraction}")

    def default_model_name(self, data: "DataConfig") -> str:
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(data.path or "images").resolve().name).strip("-")
        return f"imgclf-{slug or 'images'}"

    def fetch(self, cfg: "Config", dest: Path, mirrors: list[str], info: Log, warn: Log,
              progress: Optional["Progress"]) -> dict:
        from .snapshot import snapshot

        found = snapshot(cfg.data.path, dest, log=warn, link=cfg.runtime.link, classes=cfg.data.classes)
        info(f"snapshot of {cfg.data.path}: {found.count} images in {len(found.classes)} classes, "
            f"{len(found.skipped)} skipped; files " + ", ".join(f"{k} {v}" for k, v in sorted(found.placed.items())))
        return {"source": self.name, "classes": found.classes, "images": found.count, "skipped": len(found.skipped),
                "placed": found.placed}

    def load(self, data: "DataConfig", folder: Path, progress: Optional["Progress"] = None):
        from .splits import load_imagefolder

        everything, classes = load_imagefolder(folder, data, progress)
        return everything, None, classes  # no test split of its own: prepare draws one

    def origin(self, data: "DataConfig", folder: Path) -> dict:
        from .snapshot import read_manifest

        return dict(read_manifest(folder)["origin"])

    def check_origin(self, meta_path: Path, origin: dict, data: "DataConfig") -> None:
        got, want = origin.get("path"), str(Path(data.path or "").resolve())
        if got != want:
            raise ValueError(f"{meta_path}: prepared from the folder {got}, but data.path is {want}; "
                             "run download and prepare again")


DATA_SOURCES: dict[str, Any] = {name: MnistFamily(spec) for name, spec in SOURCES.items()}
DATA_SOURCES["imagefolder"] = ImageFolderSource()


def data_source(name: str) -> DataSource:
    try:
        return DATA_SOURCES[name]
    except KeyError:
        raise ValueError(f"data.source: {name!r} is not a known source ({', '.join(DATA_SOURCES)})") from None
