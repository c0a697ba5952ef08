"""Batch inference and drift on real data: the production model scores a batch in one pass, and each
drift detector flags the shifts it should (rotated, inverted, Fashion-MNIST) and not the clean test split."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf import config
from imgclf.data.idx import IMAGES_MAGIC, read_idx, write_idx
from imgclf.monitoring import drift as d
from imgclf.monitoring.inputs import read_batch

from .helpers import MNIST_NAMES, SMALL_REAL_MNIST, cli, write_params
from .test_trust import write_mnist_subset

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def test_drift_statistics_agree_with_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=3000), rng.normal(0.05, 1.1, size=5000)
    ks, p = d.ks_test(a, b)
    ref = stats.ks_2samp(a, b, method="asymp")
    assert ks == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue, rel=0.1)
    assert d.wasserstein(a, b) == pytest.approx(stats.wasserstein_distance(a, b))
    assert d.chi2_sf(20.0, 9) == pytest.approx(stats.chi2.sf(20.0, 9))
    pos, neg = np.round(rng.normal(0.1, 1, 2000), 1), np.round(rng.normal(0, 1, 2000), 1)  # many ties
    auc, p = d.auc_test(pos, neg)
    mw = stats.mannwhitneyu(pos, neg, alternative="greater")
    assert auc == pytest.approx(mw.statistic / 4e6) and p == pytest.approx(mw.pvalue, rel=0.05)


def test_same_distribution_is_not_drift_and_a_shift_is():
    rng = np.random.default_rng(1)
    cfg = config.DriftConfig(permutations=100, sample=300)
    ref = d.Profile({"brightness": rng.normal(0.2, 0.05, 800)}, rng.normal(size=(800, 16)), rng.integers(0, 4, 800))
    same = d.Profile({"brightness": rng.normal(0.2, 0.05, 600)}, rng.normal(size=(600, 16)), rng.integers(0, 4, 600))
    moved = d.Profile({"brightness": rng.normal(0.25, 0.05, 600)}, rng.normal(size=(600, 16)) + 0.5,
                      np.zeros(600, dtype=int))
    classes = ["a", "b", "c", "d"]
    assert not d.detect(ref, same, classes, cfg)["drifted"]
    report = d.detect(ref, moved, classes, cfg)
    assert report["flagged"] == ["image_stats", "embeddings", "classes"], report["reason"]
    small = d.detect(ref, d.Profile({"brightness": np.ones(5)}, np.ones((5, 16)), np.zeros(5, dtype=int)), classes, cfg)
    assert small["tested"] is False and "min_images" in small["reason"]


def test_a_folder_batch_names_its_rejects_and_leaves_scored_and_fresh_files(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "a" / "b").mkdir(parents=True)
    (inbox / "scored" / "old").mkdir(parents=True)
    (inbox / ".hidden").mkdir()
    img = (np.arange(32 * 40) % 255).astype(np.uint8).reshape(32, 40)
    Image.fromarray(img).save(inbox / "one.png")
    Image.fromarray(img).convert("RGB").save(inbox / "a" / "b" / "two.jpg")
    Image.fromarray(img).save(inbox / "scored" / "old" / "done.png")
    Image.fromarray(img).save(inbox / ".hidden" / "x.png")
    (inbox / "notes.txt").write_text("not an image")
    (inbox / "cut.png").write_bytes((inbox / "one.png").read_bytes()[:60])
    old = time.time() - 60
    for p in inbox.rglob("*"):
        os.utime(p, (old, old))
    Image.fromarray(img).save(inbox / "uploading.png")  # changed just now: left for the next batch
    batch = read_batch(inbox, 1, 28, settle_s=30)
    assert batch.ids == ["a/b/two.jpg", "one.png"]
    assert [r[0] for r in batch.rejected] == ["cut.png", "notes.txt"] and "not a usable image" in batch.rejected[0][1]
    assert batch.images.shape == (2, 1, 28, 28) and batch.sizes.tolist() == [[40, 32], [40, 32]]
    assert len(set(batch.hashes)) == 2 and len(batch.files) == 4  # the rejects are read too (they leave an inbox)
    assert len(read_batch(inbox, 1, 28)) == 3
    with pytest.raises(ValueError, match="no usable images"):
        read_batch(inbox / "scored" / "old" / "..", 1, 28, settle_s=3600)
    bad = tmp_path / "x-idx3-ubyte"
    write_idx(bad, np.zeros((3, 20, 20), dtype=np.uint8))
    with pytest.raises(ValueError, match="1x20x20; the model takes 1x28x28"):
        read_batch(bad, 1, 28)


def test_monitor_settings_are_checked_by_name():
    for key, value in (("monitor.drift.alpha", 1.5), ("monitor.drift.max_domain_auc", 0.4),
                       ("monitor.reference_size", 5), ("monitor.drift.bogus", 1), ("monitor.drift.permutations", 50)):
        with pytest.raises(config.ConfigError, match=key.rsplit(".", 1)[-1]):
            config.from_dict({}, {key: value})


def _idx(path: Path, images: np.ndarray) -> str:
    write_idx(path, np.ascontiguousarray(images))
    return str(path)


@pytest.mark.integration
def test_real_batches_clean_rotated_inverted_and_fashion(workdir, shared_mnist, mlflow_server, monkeypatch, tmp_path):
    """A small CNN trained on 6,000 real MNIST images, registered and promoted; then 2,000 images of the test
    split as a batch (as PNG files, a corrupt one among them), and the same rotated 90°, inverted, and
    Fashion-MNIST's test images as IDX batches."""
    import mlflow
    from imgclf.stages.predict_batch import predict_batch_stage

    write_mnist_subset(shared_mnist, workdir / "data/raw/mnist", 6000, 1000)
    write_params(workdir / "params.yaml", {**SMALL_REAL_MNIST, "runtime.tracking.experiment": "monitor",
                                           "register.model_name": "monitor", "monitor.drift.permutations": 100})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for stage in ("prepare", "train", "evaluate", "register"):
        res = cli(stage)
        assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["promoted"]

    test = read_idx(shared_mnist / MNIST_NAMES[2], IMAGES_MAGIC)
    clean = test[np.random.default_rng(0).permutation(len(test))[:2000]]  # all of t10k's writers
    folder = tmp_path / "clean"
    folder.mkdir()
    for i, img in enumerate(clean):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    # names anyone can give a file: a spreadsheet formula, bytes that are not UTF-8 (both sort after the digits)
    Image.fromarray(clean[0]).save(folder / "=HYPERLINK(x).png")
    Image.fromarray(clean[1]).save(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png"))

    res = cli("predict-batch", str(folder), "--out", str(tmp_path / "out-clean"), "--fail-on-drift")  # no drift: 0
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["images"] == 2002 and summary["rejected"] == 1 and summary["version"] == "1"
    assert summary["drift"]["tested"] and not summary["drift"]["drifted"], summary["drift"]["reason"]
    assert summary["drift"]["reference_verified"]  # the split the model's run recorded
    rows = list(csv.DictReader(open(tmp_path / "out-clean/predictions.csv")))
    assert len(rows) == 2002 and rows[0]["model"] == "monitor" and rows[0]["version"] == "1"
    assert rows[2000]["id"] == "'=HYPERLINK(x).png" and rows[2001]["id"] == "caf\\udce9.png"  # text, escaped
    labels = np.array([int(r["class"]) for r in rows[:2000]])
    truth = read_idx(shared_mnist / MNIST_NAMES[3], 0x801)[np.random.default_rng(0).permutation(len(test))[:2000]]
    assert (labels == truth).mean() > 0.9  # the rows are the right images' predictions, in order
    assert all(len(r["input_sha256"]) == 64 for r in rows)
    for f in ("summary.json", "drift.json", "drift.html", "drift.png", "profile.npz", "rejected.csv"):
        assert (tmp_path / "out-clean" / f).is_file(), f
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["run_kind"] == "inference" and run.data.tags["model.version"] == "1"
    assert run.data.tags["model.run_id"] == client.get_model_version("monitor", "1").run_id
    assert run.data.metrics["images"] == 2002 and "drift.embeddings.domain_auc" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "batch")} >= {"batch/predictions.csv",
                                                                                    "batch/drift.html"}

    cfg = config.load("params.yaml")
    batches = {"rotated": np.rot90(clean, 1, (1, 2)), "inverted": 255 - clean}
    if FASHION.is_file():
        batches["fashion"] = read_idx(FASHION, IMAGES_MAGIC)[:2000]
    expected = {"rotated": {"embeddings", "classes"}, "inverted": {"image_stats", "embeddings"},
                "fashion": {"image_stats", "embeddings", "classes"}}
    for name, images in batches.items():
        out = predict_batch_stage(cfg, _idx(tmp_path / f"{name}-idx3-ubyte", images), out=str(tmp_path / f"out-{name}"))
        report = json.loads((tmp_path / f"out-{name}/drift.json").read_text())
        print(f"\n{name}: " + "; ".join(f"{k} {v['drifted']}" for k, v in report["detectors"].items())
              + f" | AUC {report['detectors']['embeddings']['domain_auc']}, MMD p "
              f"{report['detectors']['embeddings']['mmd_p_value']:.3g}, TVD {report['detectors']['classes']['tvd']}")
        assert out["drift"]["drifted"] and expected[name] <= set(report["flagged"]), (name, report["reason"])
    # A script asks for an exit status: 3 for a drifted batch, once its outputs are written and its summary printed.
    res = cli("predict-batch", str(tmp_path / "inverted-idx3-ubyte"), "--out", str(tmp_path / "out-inverted-cli"),
              "--fail-on-drift")
    assert res.exit_code == 3 and json.loads(res.stdout)["drift"]["drifted"], res.output[-2000:]
    assert (tmp_path / "out-inverted-cli/predictions.csv").is_file()
    # Rotation keeps every pixel: the image statistics must not call it drift (they would be guessing).
    rotated = json.loads((tmp_path / "out-rotated/drift.json").read_text())
    assert not rotated["detectors"]["image_stats"]["drifted"]

    # Without tracking nothing ties the local split to the model: the verdict comes, marked unverified.
    untracked = predict_batch_stage(config.load("params.yaml", ["runtime.tracking.enabled=false"]), str(folder),
                                    out=str(tmp_path / "out-untracked"))
    assert untracked["drift"]["reference_verified"] is False and "mlflow_run_id" not in untracked

    with pytest.raises(FileExistsError, match="never overwritten"):
        predict_batch_stage(cfg, str(folder), out=str(tmp_path / "out-clean"))
    # Two runs for one --out: the second fails before scoring and logs no run; a folder that appears at the
    # target while scoring (made by something else) leaves a FAILED run, never a FINISHED one for a folder
    # this run did not write.
    from imgclf.locks import FolderBusy
    from imgclf.stages.predict_batch import _claim

    inference = client.get_experiment_by_name("monitor-inference").experiment_id
    runs_before = len(client.search_runs([inference]))
    with _claim(tmp_path / "out-race"), pytest.raises(FolderBusy, match="another predict-batch is writing"):
        predict_batch_stage(cfg, str(folder), out=str(tmp_path / "out-race"))
    assert len(client.search_runs([inference])) == runs_before

    def someone_else_writes(what, done, total):
        (tmp_path / "out-race").mkdir(exist_ok=True)
        (tmp_path / "out-race/theirs.txt").write_text("x")

    with pytest.raises(OSError):
        predict_batch_stage(cfg, str(folder), out=str(tmp_path / "out-race"), progress=someone_else_writes)
    after = client.search_runs([inference], order_by=["attributes.start_time DESC"])
    assert len(after) == runs_before + 1 and after[0].info.status == "FAILED"
    assert sorted(p.name for p in (tmp_path / "out-race").iterdir()) == ["theirs.txt"]
    (workdir / "data/processed/meta.json").write_text(json.dumps({
        **json.loads((workdir / "data/processed/meta.json").read_text()), "sha256": {"val.pt": "0" * 64}}))
    res = cli("predict-batch", str(folder), "--out", str(tmp_path / "out-mismatch"))
    assert res.exit_code != 0 and "is not the validation split models:/monitor/1 was trained" in res.stderr
    assert not (tmp_path / "out-mismatch").exists() and not list(tmp_path.glob(".out-mismatch*"))
