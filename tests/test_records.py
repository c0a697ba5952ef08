"""Records that can't be fooled: one data set per snapshot, images decoded as they look, no comparison of
models that classify different things, no record continued in another tracking store. Real folders,
real images, the embedded store."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imgclf.data.imagefolder import decode

from .helpers import TINY_OVERRIDES, cli, write_params


def _folder(root, classes: list[str], per_class: int = 12, size: int = 12):
    for i, cls in enumerate(classes):
        for j in range(per_class):
            arr = np.full((size, size), 30 + 200 * i // max(len(classes) - 1, 1), dtype=np.uint8)
            arr[j % size] = 255 - arr[0, 0]
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / cls / f"{j}.png")
    return root


def _imgfolder_params(workdir, path, **more):
    write_params(workdir / "params.yaml", {**TINY_OVERRIDES, "data.source": "imagefolder", "data.path": str(path),
                                           "data.image_size": 12, "paths.dvc_file": None, "data.val_fraction": 0.25,
                                           "data.test_fraction": 0.25, "train.max_epochs": 1, **more})


def test_a_snapshot_of_one_folder_never_passes_for_another(workdir, tmp_path):
    a = _folder(tmp_path / "A", ["cat", "dog"])
    b = _folder(tmp_path / "B", ["cat", "dog", "bird"])
    _imgfolder_params(workdir, a)
    assert cli("download").exit_code == 0
    res = cli("prepare", "--set", f"data.path={b}")
    assert res.exit_code == 1 and f"a snapshot of {a}, but data.path is {b}" in res.stderr, res.output
    assert not (workdir / "data/processed").exists()
    assert cli("prepare").exit_code == 0
    meta = json.loads((workdir / "data/processed/meta.json").read_text())
    assert meta["origin"]["path"] == str(a) and len(meta["origin"]["digest"]) == 64
    res = cli("train", "--set", f"data.path={b}")
    assert res.exit_code == 1 and f"prepared from the folder {a}, but data.path is {b}" in res.stderr, res.output
    assert cli("train").exit_code == 0
    res = cli("evaluate", "--set", f"data.path={b}")  # register: in the tracked test below
    assert res.exit_code == 1 and f"prepared from the folder {a}, but data.path is {b}" in res.stderr, res.output
    # A second download of B replaces the snapshot, without taking A's files for B's (same names, sizes, mtimes).
    assert cli("download", "--set", f"data.path={b}").exit_code == 0
    manifest = json.loads((workdir / "data/raw/imagefolder/manifest.json").read_text())
    assert manifest["origin"]["path"] == str(b) and manifest["counts"]["bird"] == 12


def test_keys_the_source_ignores_are_refused(workdir, tmp_path):
    for override, key in ((f"data.path={tmp_path}", "data.path"), ("runtime.link=hardlink", "runtime.link")):
        res = cli("download", "--set", override)
        assert res.exit_code == 2 and f"{key}: only for imagefolder" in res.stderr, res.output


def test_16_bit_and_float_images_are_scaled_by_their_range(tmp_path):
    ramp = (np.arange(16 * 16).reshape(16, 16) * 3).astype(np.uint16)  # 0..765: PIL's clip makes it 0/255
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    conversions: dict[str, int] = {}
    out = decode(tmp_path / "ramp16.png", 16, 1, conversions)[0]
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 200, np.unique(out)[:10]
    assert np.all(np.diff(out.astype(int).ravel()) >= 0)  # the ramp stays a ramp, not a step
    Image.fromarray(ramp.astype(np.float32) / 765.0).save(tmp_path / "ramp.tiff")
    assert np.abs(decode(tmp_path / "ramp.tiff", 16, 1, conversions)[0].astype(int) - out).max() <= 1
    assert any("-> L (scaled by its range)" in k for k in conversions), conversions


def test_exif_orientation_is_applied(tmp_path):
    """A camera JPEG stored sideways with orientation 6 (rotate 90° clockwise to view) decodes upright."""
    arr = np.zeros((32, 32), dtype=np.uint8)
    arr[:, :8] = 255  # stored: a bright band on the left
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "sideways.jpg", exif=exif.tobytes(), quality=95)
    conversions: dict[str, int] = {}
    out = decode(tmp_path / "sideways.jpg", 32, 1, conversions)[0].astype(int)
    assert out[:8].mean() > 200 and out[-8:].mean() < 50, "viewed upright the band is at the top"
    assert conversions == {"EXIF orientation 6 applied": 1}


def test_prepare_counts_conversions_once(workdir, tmp_path, caplog):
    root = _folder(tmp_path / "imgs", ["a", "b"])
    ramp = (np.arange(12 * 12).reshape(12, 12) * 7).astype(np.uint16)
    Image.fromarray(ramp).save(root / "a" / "wide.png")
    _imgfolder_params(workdir, root)
    assert cli("download").exit_code == 0
    caplog.set_level(logging.INFO, logger="imgclf")
    res = cli("prepare")
    assert res.exit_code == 0, res.output
    conversions = json.loads(res.stdout)["conversions"]
    assert [n for k, n in conversions.items() if "scaled by its range" in k] == [1], conversions
    assert [r.message for r in caplog.records if r.message.startswith("decoding converted images: 1 x")]
    assert json.loads((workdir / "data/processed/meta.json").read_text())["conversions"] == conversions


@pytest.mark.slow
def test_records_of_another_store_are_refused_and_other_tasks_are_not_compared(workdir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    b = _folder(tmp_path / "B", ["cat", "dog", "bird"])
    a = _folder(tmp_path / "A", ["cat", "dog"])
    # B's model (one epoch, so calibration and behaviour are not held to the gate's limits) is production.
    _imgfolder_params(workdir, b, **{"runtime.tracking.enabled": True, "runtime.tracking.uri": store,
                                     "register.model_name": "shared", "register.min_score": 0.0,
                                     "register.max_ece": 1.0, "evaluate.perturbations": []})
    for stage in ("download", "prepare", "train", "evaluate", "register"):
        res = cli(stage)
        assert res.exit_code == 0, (stage, res.output)
    assert json.loads(res.stdout)["promoted"]

    # A model of A (2 classes) is registered under the same name, but not compared with B's, nor promoted.
    for stage in ("download", "prepare", "train", "evaluate"):
        assert cli(stage, "--set", f"data.path={a}").exit_code == 0
    reg = cli("register", "--set", f"data.path={a}")
    assert reg.exit_code == 0, reg.output
    decision = json.loads(reg.stdout)
    assert not decision["promoted"] and "cannot be compared" in decision["reason"], decision
    assert "3 classes [bird, cat, dog]" in decision["reason"] and "2 classes [cat, dog]" in decision["reason"]

    # The checkout's records name that store: another store's stages refuse them, naming both.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    for stage in ("evaluate", "register"):
        res = cli(stage, "--set", f"data.path={a}", "--set", f"runtime.tracking.uri={other}")
        assert res.exit_code == 1 and f"lives in the tracking store {store}, but this stage would use {other}" \
            in res.stderr, res.output


@pytest.mark.slow
def test_predict_without_a_model_lists_the_registered_ones(workdir, tmp_path):
    store = f"sqlite:///{tmp_path / 'store.db'}"
    import mlflow

    client = mlflow.MlflowClient(store, store)
    client.create_registered_model("imgclf-fashion-mnist")
    img = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(img)
    out = subprocess.run([sys.executable, "-m", "imgclf.cli", "predict", str(img), "--set", f"runtime.tracking.uri={store}"],
                         cwd=workdir, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    assert "models:/imgclf-mnist@production" in line and "registered models: imgclf-fashion-mnist" in line, line
    assert "--model-uri" in line
