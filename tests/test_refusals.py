"""Refuse before work, stage by stage: a stage that refuses (its records do not match, its input is missing,
its tracking server is away) leaves every output folder of the last good run byte for byte as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from .helpers import cli

pytestmark = pytest.mark.integration

OUTPUTS = ("data/raw", "data/processed", "models", "metrics", "reports")
AWAY = "http://127.0.0.1:9"  # nothing listens on the discard port


def snapshot(root: Path) -> dict[str, str]:
    """Every file under the output folders (dotfiles too): path -> sha256 of its bytes."""
    out = {}
    for folder in OUTPUTS:
        for p in sorted((root / folder).rglob("*")):
            if p.is_file():
                out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def good_run(tracked_workdir) -> dict[str, str]:
    for stage in ("train", "evaluate", "register"):
        res = cli(stage)
        assert res.exit_code == 0, f"{stage}: {res.output}"
    before = snapshot(tracked_workdir)
    assert {"models/best.pt", "models/registered.json", "metrics/test.json", "reports/per_class.csv"} <= set(before)
    return before


CASES = {
    # stage: (the refusal, a word its one-line error must contain)
    "download": (["--set", "data.source=imagefolder", "--set", "data.path=no/such/folder"], "no/such/folder"),
    "prepare": (["--set", "data.source=fashion-mnist"], "run the download stage first"),
    "train": (["--set", f"runtime.tracking.uri={AWAY}"], "127.0.0.1:9"),
    "evaluate": (["--set", f"runtime.tracking.uri={AWAY}"], "127.0.0.1:9"),
    "register": (["--set", f"runtime.tracking.uri={AWAY}"], "127.0.0.1:9"),
}


@pytest.mark.parametrize("stage", list(CASES))
def test_a_refused_stage_leaves_every_output_as_it_was(stage, good_run, tracked_workdir):
    args, named = CASES[stage]
    res = cli(stage, *args)
    assert res.exit_code != 0, res.output
    assert named in res.stderr and len(res.stderr.strip().splitlines()[-1]) < 600, res.stderr
    assert snapshot(tracked_workdir) == good_run


def test_evaluate_refuses_an_untracked_training_before_writing(tracked_workdir):
    """A training made with tracking off cannot be evaluated into MLflow: refused, and the evaluation
    outputs of the tracked run before it stay."""
    for stage in ("train", "evaluate"):
        assert cli(stage).exit_code == 0
    assert cli("train", "--set", "runtime.tracking.enabled=false").exit_code == 0
    before = snapshot(tracked_workdir)
    res = cli("evaluate")
    assert res.exit_code == 1 and "not tracked" in res.stderr, res.output
    assert snapshot(tracked_workdir) == before
