import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imgclf import config
from imgclf.config import ConfigError, ModelConfig
from imgclf.data.batches import Batches, Split, load_split, random_shift
from imgclf.models import KINDS
from imgclf.models.classifier import architecture, build_model, from_architecture, parameter_count
from imgclf.training.checkpoint import Checkpointing, CheckpointMismatch, load_checkpoint, save_torch
from imgclf.training.loop import Hooks, NonFiniteLoss, evaluate_batches, fit

from .helpers import REPO, TINY_OVERRIDES, cli, separable_digits

CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape, classes", [((1, 28, 28), 10), ((3, 32, 32), 4), ((3, 64, 64), 3), ((1, 4, 4), 2)])
def test_every_kind_builds_for_any_shape_and_round_trips_its_record(kind, shape, classes):
    model = build_model(ModelConfig(kind=kind), shape, classes)
    assert model(torch.rand(5, *shape)).shape == (5, classes)
    arch = architecture(ModelConfig(kind=kind), shape, classes, [str(c) for c in range(classes)],
                        {"mean": [0.0] * shape[0], "std": [1.0] * shape[0]})
    assert list(arch["model"]) == ["kind", kind]  # the active kind's params only
    rebuilt = from_architecture(arch)
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_an_unknown_kind_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"^model.kind: must be one of " + ", ".join(KINDS)):
        config.from_dict({}, {"model.kind": "transformer"})


def test_default_mlp_needs_more_parameters_than_cnn():
    cfg = config.load(REPO / "params.yaml")
    mlp = build_model(ModelConfig(kind="mlp", mlp=cfg.model.mlp), (1, 28, 28), 10)
    cnn = build_model(ModelConfig(kind="cnn", cnn=cfg.model.cnn), (1, 28, 28), 10)
    assert parameter_count(mlp) > 2 * parameter_count(cnn)


def _split(n, seed, size=28):
    x, y = separable_digits(n, seed, size=size)
    return Split(torch.from_numpy(x)[:, None].contiguous(), torch.from_numpy(y).long())


def _cfg(**kw):
    return config.from_dict({}, {**TINY_OVERRIDES, **{f"train.{k}": v for k, v in kw.items()}}).train


def _model(kind="cnn"):
    cfg = config.from_dict({}, TINY_OVERRIDES).model
    torch.manual_seed(0)
    return build_model(dataclasses.replace(cfg, kind=kind), (1, 28, 28), 10, [0.5], [0.5])


def test_one_step_lowers_loss():
    model = _model()
    data = _split(64, 0)
    x, y = data.images.float() / 255, data.labels
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    before = F.cross_entropy(model(x), y)
    opt.zero_grad()
    before.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)
    assert after.item() < before.item()


@pytest.mark.parametrize("kind", list(KINDS))
def test_tiny_set_is_overfit(kind):
    data = Batches(_split(100, 1), CPU)
    model = _model(kind)
    result = fit(model, data, data, _cfg(max_epochs=30, augment_shift=0, lr=0.005))
    loss, acc = evaluate_batches(model, data, 100)
    assert acc == 1.0 and result.kept_val_acc == 1.0


def test_random_shift_moves_content():
    x = torch.zeros(2, 1, 6, 6)
    x[:, :, 2, 2] = 1.0
    gen = torch.Generator().manual_seed(0)
    shifted = random_shift(x, 2, gen)
    assert shifted.shape == x.shape and torch.all(shifted.sum(dim=(1, 2, 3)) == 1)
    assert random_shift(x, 0, gen) is x


def test_early_stopping_restores_best_epoch():
    train = Batches(_split(120, 2), CPU)
    val = Batches(_split(60, 3), CPU)
    model = _model()
    seen = []
    result = fit(model, train, val, _cfg(max_epochs=10, patience=2, min_delta=100.0),
                 hooks=Hooks(on_epoch_end=lambda r: seen.append(r["epoch"])))
    # Nothing can beat epoch 1 by min_delta=100, so training stops after 1 + patience epochs.
    assert result.stopped_early and result.kept_epoch == 1 and seen == [1, 2, 3]
    loss, _ = evaluate_batches(model, val, 60)
    assert loss == pytest.approx(result.history[0]["val_loss"], rel=1e-5)


def test_checkpoint_round_trip_leaves_no_temp(tmp_path):
    state = {"model": _model().state_dict(), "epoch": 3, "history": [{"a": 1.0}]}
    save_torch(tmp_path / "ck.pt", state)
    back = load_checkpoint(tmp_path / "ck.pt")
    assert back["epoch"] == 3 and all(torch.equal(back["model"][k], v) for k, v in state["model"].items())
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="bad.pt: not a checkpoint this project wrote"):
        load_checkpoint(tmp_path / "bad.pt")


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    train, val = Batches(_split(150, 4), CPU), Batches(_split(50, 5), CPU)
    cfg = _cfg(max_epochs=4, augment_shift=2)
    full = fit(_model(), train, val, cfg, checkpoint=Checkpointing(tmp_path / "a.pt"))

    def stop_after_2(record):
        if record["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(_model(), train, val, cfg, checkpoint=Checkpointing(tmp_path / "b.pt"), hooks=Hooks(on_epoch_end=stop_after_2))
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 1  # the callback runs before the epoch's checkpoint
    resumed = fit(_model(), train, val, cfg, checkpoint=Checkpointing(tmp_path / "b.pt", resume=True))
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]
    for k, v in full.best_state.items():
        assert torch.equal(v, resumed.best_state[k]), k
    with pytest.raises(CheckpointMismatch, match="b.pt: made with other"):
        fit(_model(), train, val, cfg, checkpoint=Checkpointing(tmp_path / "b.pt", True, {"other": 1}))


def test_nan_loss_stops_with_epoch_and_batch(tmp_path):
    train, val = Batches(_split(200, 6), CPU), Batches(_split(50, 7), CPU)
    cfg = _cfg(optimizer="sgd", lr=1e12, momentum=0.0, schedule="none", max_epochs=3)
    with pytest.raises(NonFiniteLoss, match=r"epoch \d+, batch \d+: loss is") as exc:
        fit(_model("mlp"), train, val, cfg, checkpoint=Checkpointing(tmp_path / "ck.pt"))
    epoch = int(str(exc.value).split(",")[0].split()[-1])
    if epoch > 1:  # the last good epoch's checkpoint is intact
        assert load_checkpoint(tmp_path / "ck.pt")["epoch"] == epoch - 1


def test_cli_train_both_kinds_writes_outputs(tiny_workdir):
    for kind in ("mlp", "cnn"):
        res = cli("train", "--set", f"model.kind={kind}")
        assert res.exit_code == 0, res.output
        summary = json.loads(res.stdout)
        assert summary["model_kind"] == kind and summary["kept_val_acc"] > 0.9
    metrics = json.loads((tiny_workdir / "metrics/train.json").read_text())
    assert len(metrics["history"]) == 4 and {"train_loss", "val_acc", "lr", "images_per_s"} <= set(metrics["history"][0])
    csv_lines = (tiny_workdir / "metrics/train_history.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_loss") and len(csv_lines) == 5
    best = torch.load(tiny_workdir / "models/best.pt", weights_only=True)
    assert best["architecture"]["classes"] == [str(d) for d in range(10)]


def test_cli_nan_is_one_line(tiny_workdir):
    res = cli("train", "--set", "model.kind=mlp", "--set", "train.optimizer=sgd", "--set", "train.lr=1e12",
              "--set", "train.schedule=none")
    assert res.exit_code == 1
    assert "error: epoch" in res.stderr and "batch" in res.stderr and "loss is" in res.stderr


def test_streaming_path_matches_in_memory(tiny_workdir):
    processed = tiny_workdir / "data/processed"
    mem = Batches(load_split(processed / "train.pt"), CPU)
    stream = Batches(load_split(processed / "train.pt", mmap=True), CPU, streaming=True)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for (a, ya), (b, yb) in zip(mem.epoch(64, g1), stream.epoch(64, g2)):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    res = cli("train", "--set", "runtime.loader=stream")
    assert res.exit_code == 0 and json.loads(res.stdout)["kept_val_acc"] > 0.9
    assert not math.isnan(json.loads(res.stdout)["kept_val_loss"])
    assert Path(tiny_workdir / "models/checkpoint.pt").is_file()


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "none"])
def test_every_schedule_runs_even_a_handful_of_steps(schedule):
    from imgclf.training.epoch import make_optimizer, make_scheduler

    for steps in range(1, 12):
        cfg = config.from_dict({}, {"train.schedule": schedule, "train.max_epochs": 1})
        model = torch.nn.Linear(2, 2)
        opt = make_optimizer(model, cfg.train)
        sched = make_scheduler(opt, cfg.train, steps)
        assert (sched is None) == (schedule == "none")
        lrs = []
        for _ in range(steps):
            opt.step()
            if sched is not None:
                sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        assert all(math.isfinite(lr) and 0 <= lr <= cfg.train.lr * 1.0001 for lr in lrs), (steps, lrs)


@pytest.mark.parametrize("keep", ["last", "best_loss", "best_acc"])
def test_keep_rule_chooses_the_weights_returned(keep):
    train = Batches(_split(120, 2), CPU)
    val = Batches(_split(60, 3), CPU)
    model = _model()
    result = fit(model, train, val, _cfg(max_epochs=5, patience=100, keep=keep, lr=0.02))
    h = result.history
    want = {"last": len(h),
            "best_loss": min(h, key=lambda r: (r["val_loss"], r["epoch"]))["epoch"],
            "best_acc": min(h, key=lambda r: (-r["val_acc"], r["val_loss"], r["epoch"]))["epoch"]}[keep]
    assert result.kept_epoch == want and not result.stopped_early
    loss, _ = evaluate_batches(model, val, 60)
    assert loss == pytest.approx(h[want - 1]["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_the_same_training_alone_and_beside_another_gives_the_same_weights(tiny_workdir, tmp_path):
    """Byte-identical best.pt whatever else runs on the machine: the thread count comes from params and
    this process's cores, never from how many other trainings are running."""
    import hashlib
    import subprocess
    import sys

    two_epochs = ["--set", "train.max_epochs=2", "--set", "runtime.threads=0", "--set", "train.batch_size=64",
                  "--set", "model.cnn.channels=[16, 32]"]

    def train(*extra: str, out: str) -> subprocess.Popen:
        args = [sys.executable, "-m", "imgclf.cli", "train", *two_epochs, "--set", f"paths.models_dir={out}",
                "--set", f"paths.metrics_dir={out}-metrics", *extra]
        return subprocess.Popen(args, cwd=tiny_workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def done(proc: subprocess.Popen) -> dict:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        return json.loads(out)

    alone = done(train(out="alone"))
    other = train("--set", "train.max_epochs=40", "--set", "train.seed=7", out="other")  # running all along
    beside = done(train(out="beside"))
    other.kill()
    other.communicate()
    digest = {name: hashlib.sha256((tiny_workdir / name / "best.pt").read_bytes()).hexdigest()
              for name in ("alone", "beside")}
    assert alone["threads"] == beside["threads"]
    assert digest["alone"] == digest["beside"]


@pytest.mark.integration
def test_openmp_idle_threads_spin_briefly_unless_the_user_says_how_they_wait():
    """imgclf sets libgomp's spin count before torch loads it (two trainings sharing the cores otherwise spend
    them spinning: bench/concurrency.py --wait-policy); a spin count or a wait policy the user set stays as set."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    show = "import imgclf.cli, os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    for extra, expected in (({}, "10000 None"), ({"GOMP_SPINCOUNT": "5"}, "5 None"),
                            ({"OMP_WAIT_POLICY": "PASSIVE"}, "None PASSIVE")):
        out = subprocess.run([sys.executable, "-c", show], env={**base, **extra}, capture_output=True, text=True,
                             timeout=120, check=True)
        assert out.stdout.split("\n")[-2] == expected, out
