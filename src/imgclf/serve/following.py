"""The model being served, and the alias it follows.

Given `models:/NAME@ALIAS`, the service serves the version the alias names and reads the alias again every
`serve.poll_s`: when it has moved (a promotion, a rollback), the new version is loaded beside the old one,
warmed with one batch, and put in place by one assignment. A batch in flight finishes on the model it
started with; the next one uses the new model, so no request fails or waits for a load. Any other URI (a
version, a run, a folder) is served as it is.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..console import one_line
from ..registry.serving import LoadedModel

log = logging.getLogger("imgclf")
_ALIAS = re.compile(r"models:/([^/@]+)@([\w.-]+)")


@dataclass(frozen=True)
class Served:
    model: LoadedModel
    name: Optional[str]  # the registered model, None for a run or a folder
    version: Optional[str]
    uri: str  # what exactly answers: models:/NAME/VERSION when the registry named it

    def describe(self) -> dict[str, Optional[str]]:
        return {"name": self.name, "version": self.version, "uri": self.uri,
                "weights_sha256": self.model.weights_sha256}


def registered_name(uri: str) -> Optional[str]:
    """NAME of models:/NAME@ALIAS or models:/NAME/VERSION; None for a run or a folder."""
    named = re.fullmatch(r"models:/([^/@]+)(?:@[\w.-]+|/\d+)", uri)
    return named.group(1) if named else None


def load_served(uri: str, tracking_uri: str) -> Served:
    """The model at `uri`, warmed with one batch (its first forward pass is the slow one)."""
    model = LoadedModel(uri, tracking_uri)
    c, h, w = model.in_shape
    model.probabilities(np.zeros((1, c, h, w), dtype=np.uint8))
    name = registered_name(uri)
    exact = f"models:/{name}/{model.version}" if name and model.version else uri
    return Served(model, name, model.version, exact)


class Follower:
    """`current` is the model to score with; `start()` follows the alias in a thread of its own."""

    def __init__(self, uri: str, tracking_uri: str, poll_s: float,
                 on_swap: Optional[Callable[[Served, Served], None]] = None):
        self.uri, self.tracking_uri, self.poll_s, self.on_swap = uri, tracking_uri, poll_s, on_swap
        self.alias = _ALIAS.fullmatch(uri)
        self.current: Optional[Served] = None
        self._stop = threading.Event()

    def load(self) -> Served:
        self.current = load_served(self._exact() if self.alias else self.uri, self.tracking_uri)
        return self.current

    def _exact(self) -> str:
        """models:/NAME/VERSION the alias names now (read once, so the load cannot race a second move)."""
        import mlflow

        name, alias = self.alias.groups()
        client = mlflow.MlflowClient(self.tracking_uri, self.tracking_uri)
        return f"models:/{name}/{client.get_model_version_by_alias(name, alias).version}"

    def check(self) -> bool:
        """Load and swap in the version the alias names, if it is not the one served; True when swapped."""
        if not self.alias or self.current is None:
            return False
        exact = self._exact()
        if exact == self.current.uri:
            return False
        old, new = self.current, load_served(exact, self.tracking_uri)
        self.current = new  # one assignment: the next batch scores with it
        log.info("serve: %s moved from %s to %s; now serving v%s", self.uri, old.uri, new.uri, new.version)
        if self.on_swap is not None:
            self.on_swap(old, new)
        return True

    def start(self) -> None:
        if self.alias:
            threading.Thread(target=self._follow, name="alias-follower", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - a registry hiccup or a bad new version: keep serving
                log.warning("serve: %s not reloaded (%s); still serving %s", self.uri, one_line(exc),
                            self.current.uri if self.current else "nothing")
