import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf import config
from imgclf.data.imagefolder import ImageFolderError, scan
from imgclf.data.splits import normalization_stats, stratified_split

from .helpers import cli, make_mnist_dir, write_params


def test_stratified_split_is_proportional_and_seeded():
    labels = np.repeat(np.arange(5), [101, 57, 300, 13, 29])
    rest, held = stratified_split(labels, 0.2, seed=3)
    assert len(held) == round(len(labels) * 0.2)
    assert np.intersect1d(rest, held).size == 0 and len(rest) + len(held) == len(labels)
    for c, n in enumerate([101, 57, 300, 13, 29]):
        assert abs((labels[held] == c).sum() - n * 0.2) <= 1
    again = stratified_split(labels, 0.2, seed=3)
    other = stratified_split(labels, 0.2, seed=4)
    assert np.array_equal(held, again[1]) and not np.array_equal(held, other[1])


def test_normalization_fixed_and_fitted():
    imgs = np.stack([np.full((3, 4, 4), v, np.uint8) for v in (0, 255)])
    assert normalization_stats(imgs, "fixed") == {"kind": "fixed", "mean": [0.5] * 3, "std": [0.5] * 3}
    fitted = normalization_stats(imgs, "fitted")
    assert fitted["mean"] == pytest.approx([0.5] * 3) and fitted["std"] == pytest.approx([0.5] * 3)
    imgs[:, 1] = 255
    fitted = normalization_stats(imgs, "fitted")
    assert fitted["mean"][1] == pytest.approx(1.0) and fitted["std"][1] == pytest.approx(1e-6)


def test_prepare_mnist_tiny_is_byte_identical(workdir, tmp_path):
    make_mnist_dir(workdir / "data/raw/mnist", n_train=300, n_test=60)
    assert cli("prepare").exit_code == 0
    proc = workdir / "data/processed"
    first = {p.name: p.read_bytes() for p in proc.iterdir()}
    assert sorted(first) == ["meta.json", "test.pt", "train.pt", "val.pt"]
    assert cli("prepare").exit_code == 0
    assert {p.name: p.read_bytes() for p in proc.iterdir()} == first
    meta = json.loads(first["meta.json"])
    assert meta["sizes"] == {"train": 240, "val": 60, "test": 60}
    train = torch.load(proc / "train.pt", weights_only=True)
    assert train["images"].dtype == torch.uint8 and tuple(train["images"].shape) == (240, 1, 28, 28)
    assert cli("prepare", "--set", "data.seed=1").exit_code == 0
    assert (proc / "val.pt").read_bytes() != first["val.pt"]


def test_max_per_split_draws_a_stratified_part_of_each_full_split(workdir):
    """A quick run's images are the full run's, fewer: each split cut to data.max_per_split, classes in
    proportion, and a split already smaller kept whole."""
    make_mnist_dir(workdir / "data/raw/mnist", n_train=300, n_test=60)
    assert cli("prepare").exit_code == 0
    full = {s: torch.load(workdir / f"data/processed/{s}.pt", weights_only=True) for s in ("train", "val", "test")}
    assert cli("prepare", "--set", "data.max_per_split=100").exit_code == 0
    meta = json.loads((workdir / "data/processed/meta.json").read_text())
    assert meta["sizes"] == {"train": 100, "val": 60, "test": 60} and meta["params"]["max_per_split"] == 100
    part = torch.load(workdir / "data/processed/train.pt", weights_only=True)
    assert set(part["ids"]) < set(full["train"]["ids"])
    shares = np.bincount(full["train"]["labels"].numpy(), minlength=10) / 240
    assert np.abs(np.bincount(part["labels"].numpy(), minlength=10) - 100 * shares).max() <= 1
    assert torch.load(workdir / "data/processed/val.pt", weights_only=True)["ids"] == full["val"]["ids"]


def test_prepare_fitted_normalization_from_train_only(workdir):
    make_mnist_dir(workdir / "data/raw/mnist", n_train=300, n_test=60)
    assert cli("prepare", "--set", "data.normalization=fitted").exit_code == 0
    meta = json.loads((workdir / "data/processed/meta.json").read_text())
    train = torch.load(workdir / "data/processed/train.pt", weights_only=True)["images"].double() / 255
    assert meta["normalization"]["mean"][0] == pytest.approx(train.mean().item(), abs=1e-6)
    assert meta["normalization"]["std"][0] == pytest.approx(train.std(unbiased=False).item(), abs=1e-6)


def test_prepare_without_raw_data_is_one_line(workdir):
    res = cli("prepare")
    assert res.exit_code == 1 and "data/raw/mnist: no raw data" in res.stderr


def _png(path, mode, size, value, mark=None):
    """A plain image; `mark` (x, y) draws a dark 4x4 block there, so the images are neither blank nor copies
    of each other, even shrunk to 8x8 (prepare's data checks would stop on either)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = {"L": value, "RGB": (value, 0, 0), "RGBA": (value, value, value, 255)}[mode]
    image = Image.new(mode, size, colour)
    if mark is not None:
        for dx in range(4):
            for dy in range(4):
                image.putpixel((mark[0] + dx, mark[1] + dy), {"L": 0, "RGB": (0, 0, 0), "RGBA": (0, 0, 0, 255)}[mode])
    image.save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for i in range(6):
        _png(root / "cat" / f"c{i}.png", ["L", "RGB", "RGBA"][i % 3], (20 + i, 30), 200, (2 * i, 3 * i))
        _png(root / "dog" / f"d{i}.png", ["RGBA", "L", "RGB"][i % 3], (31, 17 + i), 30, (3 * i, 2 * i))
    return root


def test_imagefolder_end_to_end_mixed_modes(workdir, folder, tmp_path, caplog):
    (folder / "dog" / "notes.txt").write_text("not an image")
    (folder / "cat" / "broken.png").write_bytes((folder / "cat" / "c0.png").read_bytes()[:40])
    Image.new("RGB", (4000, 4000), (250, 0, 0)).save(folder / "cat" / "huge.png")
    outside = tmp_path / "secret.png"
    _png(outside, "L", (8, 8), 1)
    (folder / "dog" / "link.png").symlink_to(outside)
    write_params(workdir / "params.yaml", {"data.source": "imagefolder", "data.path": str(folder),
                                           "data.image_size": 16, "data.channels": 3,
                                           "data.val_fraction": 0.25, "data.test_fraction": 0.25})
    res = cli("download")
    assert res.exit_code == 0, res.output
    for name in ("notes.txt", "broken.png", "link.png"):
        assert any(name in r.message and r.levelname == "WARNING" for r in caplog.records), name
    manifest = json.loads((workdir / "data/raw/imagefolder/manifest.json").read_text())
    assert manifest["counts"] == {"cat": 7, "dog": 6}
    assert {s["path"] for s in manifest["skipped"]} == {"dog/notes.txt", "cat/broken.png", "dog/link.png"}
    assert cli("prepare").exit_code == 0
    meta = json.loads((workdir / "data/processed/meta.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["image_shape"] == [3, 16, 16]
    assert sum(meta["sizes"].values()) == 13
    splits = {s: torch.load(workdir / f"data/processed/{s}.pt", weights_only=True) for s in ("train", "val", "test")}
    imgs = torch.cat([splits[s]["images"] for s in splits]).float()
    labels = torch.cat([splits[s]["labels"] for s in splits])
    # every cat image (grey 200, red 200, RGBA 200) is bright in channel 0, every dog one dark
    assert (imgs[labels == 0][:, 0].mean(dim=(1, 2)) > 150).all()
    assert (imgs[labels == 1][:, 0].mean(dim=(1, 2)) < 60).all()


def test_imagefolder_refusals(tmp_path, folder):
    with pytest.raises(ImageFolderError, match="does not exist"):
        scan(tmp_path / "nope")
    (folder / "bird").mkdir()
    with pytest.raises(ImageFolderError, match=r"images/bird: class folder has no readable images"):
        scan(folder)
    (folder / "bird" / "x.txt").write_text("hello")
    with pytest.raises(ImageFolderError, match="bird: class folder has no readable images"):
        scan(folder)
    one = tmp_path / "one"
    _png(one / "only" / "a.png", "L", (5, 5), 3)
    with pytest.raises(ImageFolderError, match=r"found 1 class folder\(s\) \(only\); need at least 2"):
        scan(one)


def test_imagefolder_cli_refusal_leaves_no_snapshot(workdir, tmp_path):
    one = tmp_path / "one"
    _png(one / "only" / "a.png", "L", (5, 5), 3)
    write_params(workdir / "params.yaml", {"data.source": "imagefolder", "data.path": str(one)})
    res = cli("download")
    assert res.exit_code == 1 and "need at least 2" in res.stderr
    assert not (workdir / "data/raw/imagefolder").exists()
    assert config.load(workdir / "params.yaml").data.source == "imagefolder"


def test_imagefolder_snapshot_is_incremental_and_links(tmp_path, folder, monkeypatch):
    from imgclf.data import imagefolder
    from imgclf.data.snapshot import snapshot

    dest = tmp_path / "raw" / "imagefolder"
    first = snapshot(folder, dest)
    assert sum(first.placed.values()) == 12 and "unchanged" not in first.placed
    checked = []
    monkeypatch.setattr(imagefolder, "check_image", lambda p: checked.append(p.name))
    again = snapshot(folder, dest)
    assert again.placed == {"unchanged": 12} and checked == []  # nothing decoded or copied again
    _png(folder / "cat" / "c1.png", "L", (9, 9), 7)  # edited
    _png(folder / "dog" / "new.png", "L", (9, 9), 7)  # added
    (folder / "dog" / "d0.png").unlink()  # removed
    third = snapshot(folder, dest)
    assert third.placed["unchanged"] == 10 and sorted(checked) == ["c1.png", "new.png"]
    assert not (dest / "dog" / "d0.png").exists() and (dest / "dog" / "new.png").read_bytes() == \
        (folder / "dog" / "new.png").read_bytes()
    linked = snapshot(folder, tmp_path / "linked", link="hardlink")
    assert linked.placed == {"hardlink": 12}
    assert os.path.samefile(tmp_path / "linked" / "cat" / "c2.png", folder / "cat" / "c2.png")


def test_imagefolder_class_order_and_sample_ids(workdir, folder):
    write_params(workdir / "params.yaml", {"data.source": "imagefolder", "data.path": str(folder),
                                           "data.classes": ["dog", "cat"], "data.image_size": 8,
                                           "paths.dvc_file": None})
    assert cli("download").exit_code == 0
    res = cli("prepare")
    assert res.exit_code == 0, res.stderr
    test = torch.load(workdir / "data/processed/test.pt", weights_only=True)
    assert json.loads((workdir / "data/processed/meta.json").read_text())["classes"] == ["dog", "cat"]
    assert all(i.startswith(("cat/", "dog/")) for i in test["ids"])
    assert [int(lab) for lab in test["labels"]] == [0 if i.startswith("dog/") else 1 for i in test["ids"]]
    write_params(workdir / "params.yaml", {"data.source": "imagefolder", "data.path": str(folder),
                                           "data.classes": ["dog", "bird"]})
    res = cli("download")
    assert res.exit_code == 1 and "data.classes does not match the class folders" in res.stderr and "bird" in res.stderr


@pytest.mark.integration
def test_imagefolder_odd_entries_are_skipped_and_listed(workdir, folder, tmp_path):
    """A FIFO would block a reader forever, a symlink loop fails every stat: both are skipped and listed,
    the stage goes on, and no lock is left held."""
    os.mkfifo(folder / "cat" / "pipe.png")
    (folder / "dog" / "loop.png").symlink_to(folder / "dog" / "loop.png")
    (folder / "dog" / "nowhere.png").symlink_to(tmp_path / "missing.png")
    (folder / "looping-class").symlink_to(folder / "looping-class")
    write_params(workdir / "params.yaml", {"data.source": "imagefolder", "data.path": str(folder),
                                           "data.image_size": 16, "paths.dvc_file": None})
    proc = subprocess.run([sys.executable, "-m", "imgclf.cli", "download"], cwd=workdir, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped = {s["path"]: s["reason"] for s in
               json.loads((workdir / "data/raw/imagefolder/manifest.json").read_text())["skipped"]}
    assert skipped["cat/pipe.png"].startswith("not a regular file")
    assert skipped["dog/loop.png"] == "symlink loop"
    assert skipped["looping-class"].startswith("symlink leads outside")
    assert "dog/nowhere.png" in skipped
    assert cli("prepare").exit_code == 0


def test_a_manifest_path_out_of_the_snapshot_is_refused(workdir, folder, tmp_path):
    write_params(workdir / "params.yaml", {"data.source": "imagefolder", "data.path": str(folder),
                                           "data.image_size": 16, "paths.dvc_file": None})
    assert cli("download").exit_code == 0
    secret = tmp_path / "secret.png"
    _png(secret, "L", (8, 8), 1)
    manifest_path = workdir / "data/raw/imagefolder/manifest.json"
    original = manifest_path.read_text()
    for bad in ("cat/../../../../secret.png", str(secret), "dog/d0.png"):  # out, absolute, another class
        manifest = json.loads(original)
        manifest["files"]["cat"].append(bad)
        manifest_path.chmod(0o644)
        manifest_path.write_text(json.dumps(manifest))
        res = cli("prepare")
        assert res.exit_code == 1 and "not a file of the snapshot" in res.stderr, res.output
        assert not (workdir / "data/processed").exists()


def test_a_label_outside_the_class_list_is_refused_before_allocation(tiny_workdir):
    """A split whose meta.json is consistent (its hash recorded) but whose labels name class 10**12."""
    from imgclf.files import sha256_file

    path = tiny_workdir / "data/processed/train.pt"
    blob = torch.load(path, weights_only=True)
    blob["labels"][0] = 10**12
    torch.save(blob, path)
    meta_path = tiny_workdir / "data/processed/meta.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"]["train.pt"] = sha256_file(path)
    meta_path.write_text(json.dumps(meta))
    res = cli("train")
    assert res.exit_code == 1 and "label 1000000000000 is outside the 10 classes" in res.stderr, res.output


def test_an_error_line_of_ours_is_whole_and_a_long_foreign_one_keeps_both_ends():
    """The data checks' line names every offender and ends with its fix: cut at 500 characters it lost the fix.
    A library's page-long message keeps its start and end, the cut said."""
    from imgclf.console import one_line
    from imgclf.data.checks import DataCheckError

    ours = DataCheckError("data check failed: blank images: " + ", ".join(f"c{i}/img-{i:04d}.png" for i in range(60))
                          + "; fix the data, or set data.checks.blank to warn to record it and go on")
    assert len(str(ours)) > 1000 and one_line(ours) == str(ours)
    foreign = ValueError("start " + "x" * 3000 + " the end")
    shown = one_line(foreign)
    assert shown.startswith("start x") and shown.endswith("x the end") and len(shown) < 560
    assert "[... 2534 characters ...]" in shown
