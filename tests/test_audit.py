"""imgclf audit on real MNIST: labels flipped at random (seeded) are found at the top of the ranking, near-copies
(a JPEG re-encoding, a one-pixel shift) are grouped and flagged as leakage across splits, and what a person
reviews (tables, pictures, the MLflow run of kind audit) is written."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from imgclf.audit import near_duplicates
from imgclf.audit.label_issues import stratified_folds
from imgclf.data.idx import read_pair, write_idx

from .helpers import MNIST_NAMES, cli, write_params


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.array(Image.open(buf))


def _shift(image: np.ndarray) -> np.ndarray:
    out = np.zeros_like(image)
    out[:, 1:] = image[:, :-1]  # one pixel right, a zero column shifted in
    return out


COPIES = {0: "jpeg", 1: "shift", 2: "jpeg+shift", 3: "shift"}  # test index -> how its copy in train is made


def _copy(image: np.ndarray, how: str) -> np.ndarray:
    if how == "jpeg":
        return _jpeg(image, 90)
    if how == "shift":
        return _shift(image)
    return _shift(_jpeg(image, 90))


def test_audit_recipe_names_are_the_recipes():
    import typing

    from imgclf.audit.settings import AuditConfig
    from imgclf.training.recipes import RECIPES, recipe

    assert set(typing.get_args(typing.get_type_hints(AuditConfig)["recipe"])) == set(RECIPES)
    assert recipe("fast")["train.max_epochs"] == 2 and recipe("fast") is not RECIPES["fast"]  # a copy to change


def test_folds_are_stratified_seeded_and_cover_every_image():
    labels = np.repeat(np.arange(3), [40, 41, 7])
    fold = stratified_folds(labels, 4, seed=1)
    assert (fold == stratified_folds(labels, 4, seed=1)).all() and not (fold == stratified_folds(labels, 4, seed=2)).all()
    for k in range(3):
        counts = np.bincount(fold[labels == k], minlength=4)
        assert counts.max() - counts.min() <= 1, (k, counts)


def test_near_copies_of_real_digits_are_grouped_and_different_digits_are_not(shared_mnist):
    """1,000 real test digits plus a copy of four of them (JPEG quality 90, a one-pixel shift, both): exactly
    those four pairs are grouped at the default threshold; the real digits, 1s and all, stay apart."""
    from imgclf.audit.settings import AuditConfig

    images, _ = read_pair(shared_mnist / MNIST_NAMES[2], shared_mnist / MNIST_NAMES[3])
    pool = images[:1000, 0].copy()
    copies = np.stack([_copy(pool[i], how) for i, how in COPIES.items()])
    every = torch.from_numpy(np.concatenate([pool, copies])[:, None])
    groups = near_duplicates.find(every, AuditConfig().near_duplicate_threshold)
    found = sorted(tuple(m.tolist()) for m in groups.members)
    assert found == [(i, 1000 + n) for n, i in enumerate(COPIES)], found
    assert all(s >= 0.99 for s in groups.score)
    lowered = near_duplicates.find(every, 0.9)  # the check bites: a loose threshold groups different digits too
    assert len(lowered.members) > len(COPIES)


def _mnist_with_mistakes(shared: Path, dest: Path, n_train: int, n_test: int, share: float, seed: int) -> set[str]:
    """The first real MNIST images, `share` of the train labels flipped to another class (seeded), and the
    COPIES of test images put over train images 100..103; returns the flipped train ids."""
    tr_x, tr_y = read_pair(shared / MNIST_NAMES[0], shared / MNIST_NAMES[1])
    te_x, te_y = read_pair(shared / MNIST_NAMES[2], shared / MNIST_NAMES[3])
    tr_x, tr_y, te_x, te_y = tr_x[:n_train, 0].copy(), tr_y[:n_train].copy(), te_x[:n_test, 0], te_y[:n_test]
    for n, (t, how) in enumerate(COPIES.items()):
        tr_x[100 + n], tr_y[100 + n] = _copy(te_x[t], how), te_y[t]
    rng = np.random.default_rng(seed)
    flipped = rng.choice(np.setdiff1d(np.arange(n_train), np.arange(100, 104)), int(share * n_train), replace=False)
    tr_y[flipped] = (tr_y[flipped] + rng.integers(1, 10, len(flipped))) % 10
    dest.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(MNIST_NAMES, (tr_x, tr_y, te_x, te_y)):
        write_idx(dest / name, arr)
    return {f"{MNIST_NAMES[0]}:{i}" for i in flipped.tolist()}


@pytest.mark.integration
def test_the_audit_finds_flipped_labels_and_cross_split_copies(workdir, shared_mnist, mlflow_server, monkeypatch,
                                                                caplog):
    """10,000 real training digits with 2 % of their labels flipped at random: at least 90 % of the flips are
    among the top 2.5 % of the ranking, and at least 70 % of its top 2 % are flips; the copies of test digits
    in train are groups across splits (leakage); the tables, pictures and the MLflow run of kind audit."""
    import mlflow

    n_train = 10_000
    flipped = _mnist_with_mistakes(shared_mnist, workdir / "data/raw/mnist", n_train, 1000, 0.02, seed=7)
    write_params(workdir / "params.yaml", {"runtime.threads": 2, "paths.dvc_file": None, "runtime.tracking.enabled": True,
                                           "runtime.tracking.experiment": "audit-test", "data.checks.duplicates": "off"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert cli("prepare").exit_code == 0
    caplog.set_level(logging.INFO, logger="imgclf")
    res = cli("audit")
    assert res.exit_code == 0, res.stderr[-3000:]
    record = json.loads(res.stdout)
    out = workdir / "data/audit"
    with open(out / "label_issues.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1)) and len(rows) == record["label_issues"]
    pool = [r for r in rows if r["split"] in ("train", "val")]
    top = [r["id"] for r in pool[:math.ceil(0.025 * n_train)]]
    recall = len(flipped & set(top)) / len(flipped)
    precision = len(flipped & {r["id"] for r in pool[:math.ceil(0.02 * n_train)]}) / math.ceil(0.02 * n_train)
    assert recall >= 0.9 and precision >= 0.7, (recall, precision, len(pool))
    assert all(r["given"] != r["suggested"] for r in pool[:20]) and float(pool[0]["score"]) <= float(pool[-1]["score"])
    assert record["label_issues_by_split"]["train"] + record["label_issues_by_split"]["val"] == len(pool)

    with open(out / "near_duplicates.csv", encoding="utf-8") as f:
        dups = list(csv.DictReader(f))
    leaks = {}
    for r in dups:
        leaks.setdefault(r["group"], set()).add((r["split"] == "test", r["id"], r["across_splits"]))
    copied = {(f"{MNIST_NAMES[2]}:{t}", f"{MNIST_NAMES[0]}:{100 + n}") for n, t in enumerate(COPIES)}
    across = {tuple(sorted((i for _, i, _ in g), key=lambda i: not i.startswith("t10k"))) for g in leaks.values()
              if all(a == "true" for _, _, a in g)}
    assert copied <= across, (copied, across)
    assert record["across_splits"] >= len(COPIES) and dups[0]["across_splits"] == "true"  # leakage listed first
    for name in ("label_issues.png", "near_duplicates.png"):
        assert (out / name).stat().st_size > 10_000
    assert f'"label_issues": {record["label_issues"]} (train ' in caplog.text and "across splits)" in caplog.text

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(record["mlflow_run_id"])
    assert run.data.tags["run_kind"] == "audit" and run.data.metrics["label_issues"] == record["label_issues"]
    assert run.data.tags["data.processed_sha256"] and client.get_experiment(run.info.experiment_id).name == "audit-test-audit"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "audit")} >= {"audit/label_issues.csv",
                                                                                 "audit/near_duplicates.png"}

    # --accept: the top rows become corrections, prepare applies them, each image staying in its split.
    before = json.loads((workdir / "data/processed/meta.json").read_text())
    res = cli("audit", "--accept", "5")
    assert res.exit_code == 0, res.stderr
    accepted = json.loads(res.stdout)
    assert accepted["added"] == 5 and accepted["ids"] == [r["id"] for r in rows[:5]]
    assert cli("audit", "--accept", "5").exit_code == 0  # again: nothing added twice
    with open(workdir / "data/corrections.csv", encoding="utf-8") as f:
        fixes = list(csv.DictReader(f))
    assert len(fixes) == 5 and fixes[0]["id"] == rows[0]["id"] and fixes[0]["action"] == f"relabel:{rows[0]['suggested']}"
    assert fixes[0]["reason"].startswith(f"audit rank 1: given {rows[0]['given']}, suggested {rows[0]['suggested']}")
    assert cli("prepare").exit_code == 0
    after = json.loads((workdir / "data/processed/meta.json").read_text())
    assert after["corrections"]["relabelled"] == 5 and after["corrections"]["sha256"]
    assert after["sha256"] != before["sha256"] and after["sizes"] == before["sizes"]
    for r in rows[:5]:
        split = torch.load(workdir / f"data/processed/{r['split']}.pt", weights_only=True)
        assert int(split["labels"][split["ids"].index(r["id"])]) == int(r["suggested"]), r


def test_a_corrections_file_is_refused_naming_its_line(tmp_path):
    from imgclf.data.corrections import CorrectionsError, read

    path = tmp_path / "corrections.csv"
    for body, expected in (("id,what\n", "the header must be id,action,reason,who"),
                           ("id,action,reason,who\na:1,relabel:7,r,me\na:1,drop,r,me\n", "line 3: id 'a:1' is corrected twice"),
                           ("id,action,reason,who\na:1,relabel:cat,r,me\n", "line 2: action 'relabel:cat'"),
                           ("id,action,reason,who\na:1,drop\n", "line 2: expected 4 fields")):
        path.write_text(body)
        with pytest.raises(CorrectionsError, match=expected.replace("(", r"\(")):
            read(path, [str(k) for k in range(10)])
    assert read(tmp_path / "missing.csv", ["a", "b"]) == []


def test_the_gate_counts_only_the_audit_of_this_very_data(tmp_path):
    """register.label_issues: no audit, or one of other data, is "not audited" (failing under error); the shares
    of this data's audit against max_share; warn reports without failing."""
    from imgclf import config
    from imgclf.stages.register import _label_issue_check

    sha = {"train.pt": "a" * 64, "val.pt": "b" * 64, "test.pt": "c" * 64}
    audit_dir = tmp_path / "audit"

    def check(severity: str, max_share: float = 0.01):
        cfg = config.from_dict({}, {"paths.audit_dir": str(audit_dir), "register.label_issues.severity": severity,
                                    "register.label_issues.max_share": max_share})
        return _label_issue_check(cfg, {"sha256": sha})

    assert check("off") == []
    assert not check("error")[0].passed and check("error")[0].value.startswith("not audited")
    audit_dir.mkdir()
    record = {"data_sha256": sha, "label_issues_by_split": {"train": 50, "val": 10, "test": 1},
              "images": {"train": 4000, "val": 1000, "test": 1000}}
    (audit_dir / "audit.json").write_text(json.dumps({**record, "data_sha256": {**sha, "test.pt": "d" * 64}}))
    assert check("error")[0].value.startswith("not audited")  # an audit of other data never counts
    (audit_dir / "audit.json").write_text(json.dumps(record))
    failed = check("error")[0]
    assert not failed.passed and failed.value == "suspected label errors: train+val 1.20%, test 0.10%", failed
    assert check("error", 0.02)[0].passed and check("warn")[0].passed
