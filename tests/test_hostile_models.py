"""A model folder can never run code or allocate without bound: only MLmodel (checked) and the safetensors
weights are read, whatever the URI (local folder, runs:/, an alias moved by hand, a tampered store row)
and whoever loads it (predict, the promotion gate). Real stores, real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from .helpers import TINY_OVERRIDES, cli, separable_digits, write_params

# Imported lazily by torch.export, MLflow and friends: MLflow's own loaders put <model>/code first on sys.path.
PAYLOAD_MODULES = ("sympy", "networkx", "filelock", "mpmath", "yaml", "numpy_payload")


def _imgclf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "imgclf.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.strip().splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


def _store(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow/mlflow.db'}"


def _code_payload(good: Path, dst: Path, marker: Path) -> Path:
    """The attack as seen: our own model with `code: code` in its flavors, a code/ folder of modules named
    like lazily imported libraries, and no safetensors weights (so a fallback loader would be taken)."""
    shutil.copytree(good, dst)
    spec = yaml.safe_load((dst / "MLmodel").read_text())
    for flavor in spec["flavors"].values():
        flavor["code"] = "code"
    (dst / "MLmodel").write_text(yaml.safe_dump(spec))
    (dst / "code").mkdir()
    for mod in PAYLOAD_MODULES:
        (dst / "code" / f"{mod}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    shutil.rmtree(dst / "extra_files")
    return dst


@pytest.fixture
def registered(tiny_workdir, monkeypatch, tmp_path):
    """A tiny model trained, evaluated and registered as production v1 on the embedded store; its folder."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_params(tiny_workdir / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True,
                                                "register.min_score": 0.0, "train.max_epochs": 1})
    for stage in ("train", "evaluate", "register"):
        res = cli(stage)
        assert res.exit_code == 0, res.output
    store = _store(tiny_workdir)
    client = mlflow.MlflowClient(store, store)
    good = Path(mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version("imgclf-mnist", "1").source,
                                                    dst_path=str(tmp_path / "good"), tracking_uri=store))
    img = tmp_path / "digit.png"
    Image.fromarray(separable_digits(1, 3)[0][0]).save(img)
    return tiny_workdir, client, good, img


@pytest.mark.slow
def test_a_model_folder_never_runs_its_own_code(registered, tmp_path):
    workdir, client, good, img = registered
    marker = tmp_path / "payload-ran"
    evil = _code_payload(good, tmp_path / "evil", marker)

    # 1. a local folder
    line = _error_line(_imgclf("predict", str(img), "--model-uri", str(evil), cwd=workdir))
    assert "ships code" in line and str(evil) in line and not marker.exists(), line

    # 2. the same folder logged to a run, through runs:/
    run = client.create_run(client.get_experiment_by_name("imgclf").experiment_id, run_name="attacker")
    client.log_artifacts(run.info.run_id, str(evil), "evil")
    client.set_terminated(run.info.run_id)
    line = _error_line(_imgclf("predict", str(img), "--model-uri", f"runs:/{run.info.run_id}/evil", cwd=workdir))
    assert "ships code" in line and not marker.exists(), line

    # 3. a version of it moved to production by hand: predict refuses, the gate refuses to score it
    version = client.create_model_version("imgclf-mnist", f"runs:/{run.info.run_id}/evil", run_id=run.info.run_id).version
    version = str(version)
    assert cli("promote", "--version", version).exit_code == 0
    line = _error_line(_imgclf("predict", str(img), cwd=workdir))
    assert "models:/imgclf-mnist@production" in line and "ships code" in line and not marker.exists(), line
    for stage in ("train", "evaluate"):
        assert cli(stage, "--set", "train.seed=1").exit_code == 0
    # The gate in its own process: a payload it imported would run there, not in this test.
    reg = _imgclf("register", "--set", "train.seed=1", cwd=workdir)
    assert reg.returncode == 0, reg.stderr[-3000:]
    decision = json.loads(reg.stdout)
    assert not decision["promoted"] and "could not be scored" in decision["reason"] and "ships code" in decision["reason"]
    assert str(client.get_model_version_by_alias("imgclf-mnist", "production").version) == version
    assert not marker.exists()

    # 4. the embedded store's row of the good v1 pointed at the payload (read without the MLflow client)
    db = workdir / "mlflow/mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("UPDATE model_versions SET storage_location = ? WHERE name = 'imgclf-mnist' AND version = 1",
                    (evil.as_uri(),))
    line = _error_line(_imgclf("predict", str(img), "--model-uri", "models:/imgclf-mnist/1", cwd=workdir))
    assert "ships code" in line and not marker.exists(), line

    # The payload was live: MLflow's own loader, pointed at that folder, does import it.
    subprocess.run([sys.executable, "-c", "import sys, mlflow.pytorch; "
                    f"mlflow.pytorch.load_model({str(evil)!r})"], cwd=tmp_path, capture_output=True, timeout=300,
                   env={**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"})
    assert marker.exists()


def _edited(good: Path, dst: Path, edit) -> Path:
    shutil.copytree(good, dst)
    spec = yaml.safe_load((dst / "MLmodel").read_text())
    edit(spec)
    (dst / "MLmodel").write_text(yaml.safe_dump(spec))
    return dst


def _set(path: str, value):
    def edit(spec):
        node = spec
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


SPEC_CASES = {
    "huge in_shape": (_set("metadata.in_shape", [1, 40000, 40000]), "in_shape"),
    "in_shape apart from the architecture": (_set("metadata.in_shape", [1, 32, 32]), "differ from its architecture"),
    "classes apart from the architecture": (_set("metadata.classes", list("abcdefghij")), "differ from its architecture"),
    "code key in python_function": (_set("flavors.python_function.code", "code"), "ships code"),
    "another loader": (_set("flavors.python_function.loader_module", "mlflow.sklearn"), "loader mlflow.sklearn"),
    "no architecture record": (lambda spec: spec["metadata"].pop("architecture"), "no architecture record"),
    # Probabilities divide by it: a tiny one makes every answer look certain, a string or NaN breaks predict.
    "temperature near zero": (_set("metadata.temperature", 1e-9), "temperature"),
    "temperature not a number": (_set("metadata.temperature", "hot"), "temperature"),
    "temperature NaN": (_set("metadata.temperature", float("nan")), "temperature"),
}


@pytest.mark.slow
def test_model_specs_are_checked_before_anything_is_allocated(registered, tmp_path):
    from imgclf.registry.serving import LoadedModel, ModelFormatError

    workdir, _, good, img = registered
    ok = LoadedModel(str(good), "sqlite:///unused")
    assert ok.in_shape == [1, 28, 28] and len(ok.classes) == 10
    for n, (case, (edit, expected)) in enumerate(SPEC_CASES.items()):
        folder = _edited(good, tmp_path / f"case{n}", edit)
        start = time.perf_counter()
        with pytest.raises(ModelFormatError, match=expected):
            LoadedModel(str(folder), "sqlite:///unused")
        assert time.perf_counter() - start < 5, case
    # A stray code/ folder is refused even when no flavor names it.
    folder = _edited(good, tmp_path / "stray", lambda spec: None)
    (folder / "code").mkdir()
    (folder / "code" / "sympy.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(ModelFormatError, match="ships code"):
        LoadedModel(str(folder), "sqlite:///unused")


def test_a_large_folder_without_mlmodel_is_refused_in_place(tmp_path, monkeypatch):
    """Read where it lies: nothing is copied to a temp folder first (a copy of 4 GiB took minutes)."""
    from imgclf.registry.serving import LoadedModel, ModelFormatError

    folder = tmp_path / "not-a-model"
    folder.mkdir()
    with open(folder / "big.bin", "wb") as fh:
        fh.truncate(4 << 30)  # sparse: no disk used, but a copy would write 4 GiB
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match="no MLmodel"):
        LoadedModel(str(folder), "sqlite:///unused")
    assert time.perf_counter() - start < 2
    assert not list(scratch.iterdir())
