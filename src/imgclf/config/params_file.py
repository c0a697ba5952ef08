"""Reading params files and `--set` values safely: bounded, strict YAML.

A params file may come from anyone (a pull request, a shared folder), so parsing is
bounded before any value is looked at: UTF-8 only, a size cap, no anchors or aliases
(an alias bomb expands to gigabytes), no duplicate keys (the last would silently win),
and a mapping at the top.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..schema import ConfigError

MAX_PARAMS_BYTES = 1 << 20  # a real params file is a few KiB
MAX_DEPTH = 32  # params.yaml nests 4 deep; deeper is an attack on the recursive parser and validator

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases and duplicate mapping keys."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            return self._compose(parent, index)
        finally:
            self._depth -= 1

    def _compose(self, parent, index):
        if self._depth > MAX_DEPTH:
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML anchors/aliases are not allowed (*{event.anchor})")
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML anchors/aliases are not allowed (&{event.anchor})")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: a mapping key must be a plain value")
            if key in seen:
                raise ConfigError(f"{key}: duplicate key (lines {seen[key]} and {key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({str(exc).splitlines()[0]})") from None


def read_params(path: str | Path) -> dict:
    """The params file as a mapping; every problem is a ConfigError naming the file."""
    import os
    import stat

    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; anything but a regular file is refused
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path}: not a regular file; not a params file")
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(MAX_PARAMS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    if len(data) > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_PARAMS_BYTES} bytes; not a params file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        raw = parse_yaml(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if raw is None:  # a truncated or wrongly chosen file would otherwise run everything on defaults
        raise ConfigError(f"{path}: empty (no section); a params file names at least one, e.g. `data: {{}}` for "
                          "every default")
    if not isinstance(raw, dict):
        kind = {"list": "a list", "str": "a string", "int": "a number", "float": "a number", "bool": "true/false"}
        got = kind.get(type(raw).__name__, type(raw).__name__)
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {got}")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` with a YAML scalar value, as `dvc exp run -S` spells it."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key.sub=value")
    if len(value) > 10_000:
        raise ConfigError(f"{key}: value longer than 10000 characters")
    try:
        parsed = parse_yaml(value) if value.strip() else None
    except ConfigError as exc:
        raise ConfigError(f"{key}: cannot parse value {value[:80]!r}: {exc}") from None
    if isinstance(parsed, str) and _FLOAT_RE.fullmatch(parsed.strip()):
        parsed = float(parsed)  # YAML 1.1 reads 1e-3 as a string; users mean a number
    return key, parsed
