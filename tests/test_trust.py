"""Knowing when to trust a model: data checks at prepare, calibration and temperature scaling, behavioural
tests, the model card, and a gate that uses them. Real MNIST subsets from ../shared where it matters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from imgclf import config
from imgclf.data.checks import run_checks
from imgclf.data.idx import read_pair, write_idx
from imgclf.data.splits import Dataset
from imgclf.evaluation.calibration import ece, fit_temperature

from .helpers import MNIST_NAMES, SMALL_REAL_MNIST, cli, registry_with_versions, write_params

MNIST_TESTS = ["clean", "shift_1", "shift_2", "rotate_10", "noise_0.05", "noise_0.1", "invert"]


def write_mnist_subset(shared: Path, dest: Path, n_train: int, n_test: int,
                       copies: dict[int, int] | None = None) -> None:
    """The first n_train/n_test real MNIST images as the four archives; `copies` {test index: train index}
    overwrites those train images (and labels) with test ones: exact duplicates across the splits."""
    tr_x, tr_y = read_pair(shared / MNIST_NAMES[0], shared / MNIST_NAMES[1])
    te_x, te_y = read_pair(shared / MNIST_NAMES[2], shared / MNIST_NAMES[3])
    tr_x, tr_y, te_x, te_y = tr_x[:n_train, 0].copy(), tr_y[:n_train].copy(), te_x[:n_test, 0], te_y[:n_test]
    for t, i in (copies or {}).items():
        tr_x[i], tr_y[i] = te_x[t], te_y[t]
    dest.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(MNIST_NAMES, (tr_x, tr_y, te_x, te_y)):
        write_idx(dest / name, arr)


def test_duplicates_across_train_and_test_stop_prepare_naming_them(workdir, shared_mnist, caplog):
    write_mnist_subset(shared_mnist, workdir / "data/raw/mnist", 600, 200, copies={3: 10, 7: 250})
    res = cli("prepare")
    assert res.exit_code == 1
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "data check failed: duplicates" in line
    assert "t10k-images-idx3-ubyte.gz:3" in line and "t10k-images-idx3-ubyte.gz:7" in line
    assert "train-images-idx3-ubyte.gz:10" in line and "train-images-idx3-ubyte.gz:250" in line
    assert "4 images in 2 groups of identical images (2 across splits" in line and "data.checks.duplicates" in line
    assert not (workdir / "data/processed").exists()  # nothing half-written

    # Set to warn: prepare goes on, the failure and the ids are in meta.json and the log.
    res = cli("prepare", "--set", "data.checks.duplicates=warn")
    assert res.exit_code == 0, res.stderr
    checks = {c["name"]: c for c in json.loads((workdir / "data/processed/meta.json").read_text())["checks"]}
    assert checks["duplicates"]["status"] == "failed" and checks["duplicates"]["severity"] == "warn"
    assert checks["duplicates"]["n_offending"] == 2 and checks["duplicates"]["value"] == 2
    assert all(checks[n]["status"] == "passed" for n in ("shape", "values", "labels", "balance"))
    assert any("data check duplicates failed" in r.message and r.levelname == "WARNING" for r in caplog.records)


def _dataset(images, labels, prefix):
    return Dataset(images, np.asarray(labels, dtype=np.int64), np.array([f"{prefix}{i}" for i in range(len(labels))]))


def test_balance_labels_and_blank_images_are_named():
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]

    def split(counts, prefix):
        labels = np.repeat(np.arange(len(counts)), counts)
        return _dataset(rng.integers(1, 255, (len(labels), 1, 8, 8), dtype=np.uint8), labels, prefix)

    good = {"train": split([30, 30, 30], "tr"), "val": split([10, 10, 10], "va"), "test": split([10, 10, 10], "te")}
    assert all(c["status"] == "passed" for c in run_checks(good, classes, 1, 8, config.DataChecksConfig()))

    bad = {**good, "train": split([30, 30, 2], "tr"), "test": split([10, 10, 0], "te")}
    bad["val"].images[4] = 77  # a constant image
    got = {c["name"]: c for c in run_checks(bad, classes, 1, 8, config.DataChecksConfig())}
    assert got["balance"]["status"] == "failed" and "'c' has 0 images" in got["balance"]["detail"]
    assert got["labels"]["status"] == "failed" and "test has no 'c'" in got["labels"]["detail"]
    assert got["values"]["status"] == "failed" and got["values"]["ids"] == ["val:va4"]
    assert got["shape"]["status"] == "passed" and got["duplicates"]["status"] == "passed"
    off = config.DataChecksConfig(balance="off")
    assert {c["name"]: c["status"] for c in run_checks(bad, classes, 1, 8, off)}["balance"] == "off"
    dim = {**good, "test": _dataset(good["test"].images // 32, good["test"].labels, "te")}  # stored as 0..7
    values = run_checks(dim, classes, 1, 8, config.DataChecksConfig())[1]
    assert values["status"] == "failed" and "test's brightest pixel is 7 of 255" in values["detail"]
    wrong = run_checks(good, classes, 3, 8, config.DataChecksConfig())[0]
    assert wrong["status"] == "failed" and "uint8 (N, 3, 8, 8)" in wrong["detail"]


def test_temperature_scaling_undoes_scaled_logits():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4000, 10, generator=g)
    labels = torch.multinomial(logits.softmax(1), 1, generator=g)[:, 0]  # calibrated at temperature 1 by design
    t = fit_temperature(logits[:2000] * 10, labels[:2000])
    assert 8 < t < 12  # the scale it was given, recovered on the first half
    raw, fixed = (logits[2000:] * 10).softmax(1), (logits[2000:] * 10 / t).softmax(1)
    assert ece(fixed, labels[2000:], 15) < ece(raw, labels[2000:], 15) / 4  # and it holds on the other half


def test_default_perturbations_follow_the_data_source():
    digits = config.from_dict({})
    assert ["clean", *[p.name for p in digits.evaluate.perturbations]] == MNIST_TESTS  # no mirror test for digits
    assert {p.name: p.max_drop for p in digits.evaluate.perturbations}["rotate_10"] == 0.03
    clothes = config.from_dict({"data": {"source": "fashion-mnist"}})
    limits = {p.name: p.max_drop for p in clothes.evaluate.perturbations}
    assert list(limits)[-1] == "flip" and limits["rotate_10"] == 0.08 and limits["invert"] is None
    for bad, key in (({"kind": "shift", "size": 1.5}, "whole number"), ({"kind": "noise", "size": 3}, "std"),
                     ({"kind": "blur"}, "must be one of")):
        with pytest.raises(config.ConfigError, match=key):
            config.from_dict({"evaluate": {"perturbations": [bad]}})
    with pytest.raises(config.ConfigError, match="invert twice"):
        config.from_dict({"evaluate": {"perturbations": [{"kind": "invert"}, {"kind": "invert"}]}})


@pytest.mark.integration
def test_default_cnn_on_mnist_calibration_behaviour_and_model_card(workdir, shared_mnist):
    """The default CNN on 6,000 real MNIST images for 2 epochs: scaling lowers the test ECE, the behavioural
    table has every test and class, and the model card carries it all."""
    write_mnist_subset(shared_mnist, workdir / "data/raw/mnist", 6000, 2000)
    write_params(workdir / "params.yaml", {"train.max_epochs": 2, "runtime.tracking.enabled": False,
                                           "paths.dvc_file": None})
    for stage in ("prepare", "train", "evaluate"):
        res = cli(stage)
        assert res.exit_code == 0, res.stderr
    test = json.loads((workdir / "metrics/test.json").read_text())
    assert test["ece"] < test["ece_before_scaling"] and test["temperature"] != 1.0
    calibration = json.loads((workdir / "reports/calibration.json").read_text())
    assert calibration["ece"] == test["ece"] and sum(calibration["diagram"]["count"]) == 2000

    import pandas as pd

    table = pd.read_csv(workdir / "reports/robustness.csv")
    assert list(table["test"]) == MNIST_TESTS
    assert [c for c in table.columns if c.startswith("acc[")] == [f"acc[{d}]" for d in range(10)]
    assert table.loc[0, "accuracy"] == pytest.approx(test["accuracy"])
    assert table.set_index("test").loc["invert", "accuracy"] < 0.5  # digits are white on black
    assert (workdir / "reports/robustness.png").stat().st_size > 10_000
    assert (workdir / "reports/reliability.png").stat().st_size > 10_000

    card = (workdir / "reports/model_card.md").read_text()
    head = yaml.safe_load(card.split("---\n")[1])
    results = head["model-index"][0]["results"][0]
    assert results["dataset"]["type"] == "mnist" and results["metrics"][0]["value"] == round(test["accuracy"], 6)
    for section in ("## Data", "## Training", "## Metrics", "## Per class", "## Robustness", "## Calibration",
                    "## Intended use and limits"):
        assert section in card
    assert "| duplicates | error | passed |" in card and "| rotate_10 |" in card


def _edit_last_layer(workdir: Path, change) -> None:
    """`change(weight, bias)` on the trained model's last layer (in place), keeping the training record
    consistent, as a model trained that way would be."""
    from imgclf.files import sha256_file
    from imgclf.training.checkpoint import save_torch

    best = workdir / "models/best.pt"
    blob = torch.load(best, weights_only=True)
    last = [k for k in blob["state_dict"] if k.endswith(".weight") and blob["state_dict"][k].ndim == 2][-1]
    change(blob["state_dict"][last], blob["state_dict"][last.replace(".weight", ".bias")])
    save_torch(best, blob)
    record = json.loads((workdir / "models/run.json").read_text())
    (workdir / "models/run.json").write_text(json.dumps({**record, "best_sha256": sha256_file(best)}))


def _scale_logits(workdir: Path, factor: float) -> None:
    """Multiply the logits by `factor`: an overconfident model, as a too-long training or a bad loss makes."""
    _edit_last_layer(workdir, lambda weight, bias: (weight.mul_(factor), bias.mul_(factor)))


@pytest.mark.integration
def test_gate_keeps_a_better_but_overconfident_model_out_of_production(workdir, shared_mnist, mlflow_server,
                                                                       monkeypatch):
    import mlflow
    from imgclf.registry.serving import LoadedModel

    write_mnist_subset(shared_mnist, workdir / "data/raw/mnist", 3000, 1000)
    write_params(workdir / "params.yaml", {
        "model.cnn.channels": [8, 16], "model.cnn.convs_per_block": 1, "model.cnn.head_hidden": [32],
        "train.batch_size": 64, "runtime.threads": 2, "paths.dvc_file": None, "register.min_score": 0.5,
        "runtime.tracking.experiment": "trust-gate", "register.model_name": "trust-gate",
        "evaluate.perturbations": [{"kind": "shift", "size": 1, "max_drop": 0.5}, {"kind": "invert"}]})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert cli("prepare").exit_code == 0

    def stages(*args):
        out = {}
        for stage in ("evaluate", "register"):
            res = cli(stage, *args)
            assert res.exit_code == 0, res.stderr
            out[stage] = json.loads(res.stdout)
        return out

    weak = ["--set", "train.max_epochs=2"]
    assert cli("train", *weak).exit_code == 0
    first = stages(*weak)
    assert first["register"]["promoted"], first["register"]["reason"]
    reason = first["register"]["reason"]
    assert "ece " in reason and "robust.shift_1" in reason and "data.duplicates ok" in reason
    assert "robust.invert" not in reason  # reported, not gated

    assert cli("train", "--set", "train.max_epochs=5").exit_code == 0
    _scale_logits(workdir, 10.0)
    broken = ["--set", "evaluate.calibrate=false", "--set", "train.max_epochs=5"]
    second = stages(*broken)
    reg = second["register"]
    assert second["evaluate"]["accuracy"] > first["evaluate"]["accuracy"]
    assert second["evaluate"]["ece"] > 0.05 and second["evaluate"]["temperature"] == 1.0
    assert reg["version"] == "2" and not reg["promoted"]
    assert "beats production v1" in reg["reason"]
    assert "1 trust check(s) failed (ece " in reg["reason"] and "FAIL" in reg["reason"]
    assert "registered, not promoted" in reg["reason"]
    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    assert client.get_model_version_by_alias("trust-gate", "production").version == "1"
    v2 = client.get_model_version("trust-gate", "2")
    assert v2.tags["gate.decision"] == "rejected" and v2.description.startswith("# trust-gate: ")
    assert "```yaml\nlibrary_name: pytorch" in v2.description and v2.description.endswith("```\n")
    assert "## Calibration" in v2.description

    # The served model divides by the temperature evaluate fitted: its probabilities are the calibrated ones.
    served = LoadedModel("models:/trust-gate/1", mlflow_server)
    assert served.temperature == first["evaluate"]["temperature"] != 1.0

    # predict answers with production (v1) and flags answers under evaluate.low_confidence.
    from PIL import Image

    images, labels = read_pair(shared_mnist / MNIST_NAMES[2], shared_mnist / MNIST_NAMES[3])
    files = []
    for i in range(8):
        files.append(str(workdir / f"digit{i}.png"))
        Image.fromarray(images[1000 + i, 0]).save(files[-1])
    lines = {}
    for threshold in ("0", "0.9999"):
        res = cli("predict", *files, "--set", f"evaluate.low_confidence={threshold}")
        assert res.exit_code == 0, res.stderr
        lines[threshold] = [line.split("\t") for line in res.stdout.strip().splitlines()]
    assert all(len(row) == 4 and row[3] == "models:/trust-gate/1" for row in lines["0"])
    assert all(len(row) == 4 for row in lines["0"])  # nothing is under 0
    flagged = [float(row[2]) for row in lines["0.9999"] if row[4:] == ["low-confidence"]]
    kept = [float(row[2]) for row in lines["0.9999"] if len(row) == 4]
    assert flagged and all(p <= 0.99995 for p in flagged) and all(p >= 0.99985 for p in kept)  # 4 printed digits


def test_ece_is_torchmetrics_calibration_error():
    """calibration.ece is torchmetrics' multiclass_calibration_error (L1) written out: same value, boundaries and
    confidences of exactly 1 included."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    g = torch.Generator().manual_seed(1)
    probs = (2 * torch.randn(3000, 10, generator=g)).softmax(1)
    probs[:50] = torch.nn.functional.one_hot(torch.arange(50) % 10, 10).float()  # confidence exactly 1
    probs[50:60] = torch.full((10, 10), 0.1)  # on a bin boundary
    labels = torch.randint(0, 10, (3000,), generator=g)
    for bins in (1, 10, 15):
        want = float(multiclass_calibration_error(probs, labels, 10, n_bins=bins, norm="l1"))
        assert abs(ece(probs, labels, bins) - want) < 1e-6, bins


def test_the_per_class_scores_are_torchmetrics_and_the_temperature_is_scipys_minimum():
    """scoring's per-class precision/recall/F1 and calibration's golden-section temperature, written out (see
    their docstrings for why), agree with the libraries made for them."""
    from scipy.optimize import minimize_scalar
    from torchmetrics.functional.classification import multiclass_f1_score, multiclass_precision, multiclass_recall

    from imgclf.evaluation.calibration import T_MAX, T_MIN, nll
    from imgclf.evaluation.scoring import Evaluation

    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 5, (2000,), generator=g)
    logits = 3 * torch.nn.functional.one_hot(labels, 5).float() + 2 * torch.randn(2000, 5, generator=g)
    predicted = logits.argmax(1)
    predicted[predicted == 4] = 3  # a class never predicted: precision 0 by convention, as torchmetrics says
    confusion = np.zeros((5, 5), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), predicted.numpy()), 1)
    table = Evaluation(0.0, 0.0, 0.0, list("abcde"), confusion, predicted.numpy(), np.zeros((2000, 5))).per_class()
    for column, metric in (("precision", multiclass_precision), ("recall", multiclass_recall),
                           ("f1", multiclass_f1_score)):
        want = metric(predicted, labels, 5, average=None).numpy()
        assert np.allclose(table[column].to_numpy(), want, atol=1e-6), column
    best = minimize_scalar(lambda inv: nll(logits, labels, 1 / inv), bounds=(1 / T_MAX, 1 / T_MIN), method="bounded",
                           options={"xatol": 1e-10})
    assert abs(fit_temperature(logits, labels) - 1 / best.x) < 1e-4



def test_class_names_are_shown_as_text_in_the_model_card():
    """A class is a folder's name: markup in it renders as itself, never as a tag, a link or a table break."""
    from imgclf.evaluation.model_card import md

    for name in ("<img src=x onerror=alert(1)>", "[click](javascript:alert(1))", "a|b", "**bold**"):
        shown = md(name)
        assert "<" not in shown and "](" not in shown and "|" not in shown.replace("\\|", "")
        assert "**" not in shown.replace("\\*", "")
    assert md("cat") == "cat"


def test_the_registry_description_puts_the_cards_yaml_header_last_in_a_code_block():
    """MLflow's version page renders the description as markdown without front matter: the header goes after the
    body as fenced yaml, and a card too long for the description is cut at a section, the header kept whole."""
    from imgclf.evaluation.model_card import SHORT_LIMIT, short_description

    card = "---\nlibrary_name: pytorch\nmetrics:\n- accuracy\n---\n\n# m: cnn on mnist\n\nText.\n\n## Data\n\n- a\n"
    shown = short_description(card, "LINK")
    assert shown.startswith("# m: cnn on mnist\n") and "---" not in shown
    assert shown.endswith("## Card metadata\n\n```yaml\nlibrary_name: pytorch\nmetrics:\n- accuracy\n```\n")
    long = card + "".join(f"\n## Section {i}\n\n" + "x" * 400 + "\n" for i in range(20))
    cut = short_description(long, "LINK")
    assert len(cut) <= SHORT_LIMIT and "(The full model card is the run's artifact LINK.)" in cut
    assert cut.endswith("- accuracy\n```\n") and "## Section 19" not in cut and "## Data" in cut


def test_paired_comparison_counts_flips_and_is_the_exact_mcnemar_test():
    """Production wrong on 8 class-a images the challenger fixes; the challenger breaks 2 class-b images."""
    from imgclf.registry.paired import compare, paired_checks

    labels = np.array([0] * 10 + [1] * 10)
    production, challenger = labels.copy(), labels.copy()
    production[:8] = 1
    challenger[10:12] = 0
    p = compare(labels, challenger, production, ["a", "b"], [f"id{i}" for i in range(20)])
    assert (p.n, p.fixed, p.broken) == (20, 8, 2)
    assert p.p_value == pytest.approx((45 + 10 + 1) / 2**10)  # P(8 or more of 10 flips | a fair coin)
    assert p.broken_ids == ["id10", "id11"] and p.fixed_ids == [f"id{i}" for i in range(8)]
    assert p.class_drop == pytest.approx(0.2) and p.class_dropped == "b"  # class b: recall 100 % -> 80 %
    checks = {c.name: c for c in paired_checks(p, "1", 0.05, 0.05, 0.1)}
    assert checks["paired"].text() == "paired p 0.0547 (8 fixed, 2 broken of 20 vs v1) (register.significance <= 0.05): FAIL"
    assert not checks["negative_flips"].passed and checks["negative_flips"].value == "10.00%"
    assert not checks["class_drop"].passed and checks["class_drop"].value == "20.00% (b)"
    from sklearn.metrics import f1_score

    f1 = f1_score(labels, challenger, average="macro") - f1_score(labels, production, average="macro")
    low, high = p.macro_f1_ci
    assert p.macro_f1_diff == pytest.approx(f1) and 0 < low < f1 < high  # production misses 8 of class a
    assert checks["macro_f1_diff"].value == f"{f1:+.4f} (95% CI {low:+.4f} to {high:+.4f})"
    assert compare(labels, challenger, production, ["a", "b"], list(map(str, range(20)))).macro_f1_ci == (low, high)
    assert all(c.passed and c.limit.endswith("reported") for c in paired_checks(p, "1", None, None, None))
    assert paired_checks(p, "1", 0.06, 0.1, 0.2)[0].passed  # and each limit is inclusive
    assert compare(labels, labels, labels, ["a", "b"], list(map(str, range(20)))).p_value == 1.0  # no flips


def test_the_exact_mcnemar_p_value_is_scipys_binomial_test():
    from scipy.stats import binomtest

    from imgclf.registry.paired import mcnemar_exact

    for fixed, flips in ((0, 1), (1, 1), (8, 10), (37, 61), (31, 61), (45, 60), (600, 1000), (0, 5000)):
        assert mcnemar_exact(fixed, flips) == pytest.approx(
            binomtest(fixed, flips, 0.5, alternative="greater").pvalue, rel=1e-9, abs=1e-300), (fixed, flips)


@pytest.mark.integration
def test_the_gate_keeps_a_challenger_out_that_is_better_by_noise(tmp_path):
    """One image better on 20, with 1 fixed and 0 broken: p = 0.5, so under register.significance 0.05 it is
    registered, not promoted, the p-value in the reason; the same comparison with the limit off promotes."""
    from imgclf.registry.gate import gate
    from imgclf.registry.paired import compare, paired_checks

    client = registry_with_versions(tmp_path, 3)
    labels = np.arange(20) % 2
    production = labels.copy()
    production[0] = 1
    paired = compare(labels, labels, production, ["a", "b"], list(map(str, range(20))))

    def decide(version: str, significance):
        return gate(client, "m", version, "accuracy", 1.0, 0.5, 0.0, lambda _: 0.95,
                    compare=lambda prod: paired_checks(paired, prod, significance, None, None))

    held = decide("2", 0.05)
    assert not held.promoted and "paired p 0.5 (1 fixed, 0 broken of 20 vs v1)" in held.reason, held.reason
    assert "beats production v1 by +5.0000%" in held.reason and "registered, not promoted" in held.reason
    assert client.get_model_version("m", "2").tags["gate.decision"] == "rejected"
    assert {c["name"] for c in held.checks} >= {"paired", "negative_flips", "class_drop"}
    assert decide("3", None).promoted
    assert str(client.get_model_version_by_alias("m", "production").version) == "3"


@pytest.mark.integration
def test_each_decision_counts_on_its_test_split_and_the_count_survives_a_restart(tmp_path):
    """Decisions on split A count 1, 2, 3 (promotions before them too), another split starts at 1, a client
    opened afresh on the same store (a restarted server reads the same database) goes on at 4, and past
    register.max_test_reuse the reason warns while the decision stands."""
    import mlflow
    from imgclf.registry.gate import gate

    client = registry_with_versions(tmp_path, 6)

    def decide(c, version: str, split: str, score: float, limit=None):
        return gate(c, "m", version, "accuracy", score, 0.5, 0.0, lambda _: 0.9, test_split=split, max_test_reuse=limit)

    first, second = decide(client, "2", "a" * 64, 0.95), decide(client, "3", "a" * 64, 0.85)
    assert first.test_reuse["decisions"] == 1 and first.promoted and not second.promoted
    assert second.test_reuse["decisions"] == 2 and second.test_reuse["promotions_before"] == 1
    assert "test split aaaaaaaaaaaa has now decided 2 gate decision(s) (1 promoted before)" in second.reason
    assert decide(client, "4", "b" * 64, 0.85).test_reuse["decisions"] == 1
    assert decide(client, "3", "a" * 64, 0.85).test_reuse["decisions"] == 2  # v3 decided again: the same choice
    uri = f"sqlite:///{tmp_path / 'store.db'}"  # registry_with_versions' store
    restarted = mlflow.MlflowClient(uri, uri)
    warned = decide(restarted, "5", "a" * 64, 0.85, limit=2)
    assert warned.test_reuse["decisions"] == 3 and not warned.promoted, warned.reason
    assert "WARNING: it has decided more than register.max_test_reuse 2" in warned.reason
    tags = restarted.get_model_version("m", "5").tags
    assert tags["gate.test_split"] == "a" * 64 and tags["gate.test_reuse"].startswith("test split aaaaaaaaaaaa has now "
                                                                                    "decided 3")


def _penalise_class(workdir: Path, label: int, by: float) -> None:
    """Lower the logit of class `label` by `by`: a model as right as before on the other classes and wrong on
    most of that one's images."""
    _edit_last_layer(workdir, lambda weight, bias: bias[label].sub_(by))


@pytest.mark.integration
def test_register_compares_the_challenger_with_production_image_by_image(workdir, shared_mnist, mlflow_server,
                                                                         monkeypatch):
    """Real MNIST (2,000 train, 500 test), the same tiny recipe twice: the second seed is registered, not
    promoted, the p-value in its reason; a longer training made to miss class 3 fixes images and breaks
    class 3's: refused on class drop, the broken images in flips.png and flips.csv, logged with the
    decision; each decision counts on the test split; `register --explain` prints it all."""
    import csv

    import mlflow

    write_mnist_subset(shared_mnist, workdir / "data/raw/mnist", 2000, 500)
    write_params(workdir / "params.yaml", {**SMALL_REAL_MNIST, "runtime.tracking.experiment": "paired",
                                           "register.model_name": "paired", "register.max_class_drop": 0.05})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert cli("prepare").exit_code == 0

    def pipeline(*args, change=None) -> dict:
        assert cli("train", *args).exit_code == 0
        if change:
            change()
        for stage in ("evaluate", "register"):
            res = cli(stage, *args)
            assert res.exit_code == 0, res.stderr[-3000:]
        return json.loads(res.stdout)

    first = pipeline("--set", "train.seed=0")
    assert first["promoted"] and first["paired"] is None and first["test_reuse"]["decisions"] == 1
    assert (workdir / "models/gate/flips.csv").read_text().strip() == "sample,flip,label,production,challenger"
    assert not (workdir / "models/gate/flips.png").exists()

    second = pipeline("--set", "train.seed=1")
    paired = second["paired"]
    assert second["version"] == "2" and paired["n"] == 500 and not second["promoted"], second["reason"]
    assert f"paired p {paired['p_value']:.3g} ({paired['fixed']} fixed, {paired['broken']} broken of 500 vs v1)" \
        in second["reason"] and "register.significance <= 0.05): FAIL" in second["reason"]
    assert second["test_reuse"]["decisions"] == 2 and "has now decided 2 gate decision(s) (1 promoted before)" \
        in second["reason"]

    third = pipeline("--set", "train.seed=0", "--set", "train.max_epochs=4", change=lambda: _penalise_class(workdir, 3, 4.0))
    paired, reason = third["paired"], third["reason"]
    assert paired["fixed"] > 0 and paired["broken"] > 0 and paired["class_dropped"] == "3", third
    assert not third["promoted"] and f"class_drop {paired['class_drop']:.2%} (3) (register.max_class_drop <= 5.00%): FAIL" \
        in reason, reason
    with open(workdir / "models/gate/flips.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == paired["fixed"] + paired["broken"]
    broken = [r for r in rows if r["flip"] == "broken"]
    assert [r["sample"] for r in broken][:20] == paired["broken_ids"] and all(r["production"] == r["label"] != r["challenger"]
                                                                              for r in broken)
    assert sum(r["label"] == "3" for r in broken) > len(broken) / 2  # mostly the penalised class
    assert (workdir / "models/gate/flips.png").stat().st_size > 10_000

    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    v3 = client.get_model_version("paired", "3")
    assert v3.tags["gate.flips"] == f"{paired['fixed']} fixed, {paired['broken']} broken of 500 test images vs v1"
    assert v3.tags["gate.p_value"] == f"{paired['p_value']:.4g}" and "95% CI" in v3.tags["gate.macro_f1_diff"]
    assert "has decided 2 gate decision(s) before this model (1 promoted)" in v3.description
    model_id = v3.tags["logged_model"].split("/models/")[1].split("?")[0]  # its page: test metrics, the version
    logged_model = client.get_logged_model(model_id)
    assert json.loads(logged_model.tags["mlflow.modelVersions"]) == [{"name": "paired", "version": 3}]
    measured = {m.key: (m.value, m.dataset_name) for m in logged_model.metrics if m.key.startswith("test_")}
    assert measured["test_accuracy"] == (third["challenger_score"], "mnist-test") and "test_ece" in measured
    logged = {a.path for a in client.list_artifacts(third["run_id"], "gate/v3")}
    assert logged == {"gate/v3/flips.csv", "gate/v3/flips.png"}, logged

    res = cli("register", "--explain")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "paired v3: registered, not promoted (production before: v1, after: v1)", lines
    assert any(line.startswith("class_drop") and line.endswith("FAIL") for line in lines)
    assert any(line.startswith("macro_f1_diff") for line in lines) and "has now decided 3 gate decision(s)" in res.stdout
    assert f"{paired['broken']} broken of 500" in res.stdout and "models/gate/flips.png" in res.stdout
