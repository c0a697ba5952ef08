"""Data-parallel training under torchrun: 2 CPU processes with gloo, tiny data."""

import json
import os
import subprocess
import sys

import pytest

from .helpers import cli

pytestmark = pytest.mark.integration  # real servers, processes or stores: see conftest's layers


def test_two_process_gloo_matches_single_process(tiny_workdir):
    single = cli("train", "--set", "paths.models_dir=single", "--set", "paths.metrics_dir=single")
    assert single.exit_code == 0, single.output
    single_acc = json.loads(single.stdout)["kept_val_acc"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "imgclf.cli", "train", "--set", "paths.models_dir=ddp", "--set", "paths.metrics_dir=ddp"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tiny_workdir / "ddp" / "train.json").read_text())
    assert summary["world_size"] == 2
    assert abs(summary["kept_val_acc"] - single_acc) <= 0.1 and summary["kept_val_acc"] >= 0.9
    # only rank 0 writes: one checkpoint, one best model, no stray temp files
    assert sorted(p.name for p in (tiny_workdir / "ddp").iterdir()) == [
        "best.pt", "checkpoint.pt", "run.json", "train.json", "train_history.csv", "train_scores.json"]
