import subprocess
import sys

import pytest
import yaml

from imgclf import config
from imgclf.config import Config, ConfigError

from .helpers import REPO, cli


def test_repo_params_are_the_defaults():
    assert config.load(REPO / "params.yaml") == Config()


@pytest.mark.parametrize("override, key", [
    ({"data.bogus": 1}, "data.bogus"),
    ({"bogus": {"a": 1}}, "bogus"),
    ({"train.lr": "fast"}, "train.lr"),
    ({"train.lr": -0.1}, "train.lr"),
    ({"train.lr": 0}, "train.lr"),
    ({"data.val_fraction": 1.0}, "data.val_fraction"),
    ({"data.val_fraction": 1.5}, "data.val_fraction"),
    ({"data.val_fraction": 0}, "data.val_fraction"),
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"train.batch_size": 12.5}, "train.batch_size"),
    ({"train.batch_size": True}, "train.batch_size"),
    ({"model.kind": "transformer"}, "model.kind"),
    ({"model.cnn.channels": [32, -1]}, "model.cnn.channels"),
    ({"model.cnn.kernel_size": 4}, "model.cnn.kernel_size"),
    ({"data.channels": 2}, "data.channels"),
    ({"data.source": "imagefolder"}, "data.path"),
    ({"data.image_size": 32}, "data.image_size"),
    ({"train.optimizer": "lbfgs"}, "train.optimizer"),
    ({"data.mirrors": []}, "data.mirrors"),
])
def test_rejected_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as exc:
        config.from_dict({}, override)
    assert str(exc.value).startswith(key), str(exc.value)


def test_overrides_parse_yaml_scalars():
    cfg = config.load(REPO / "params.yaml", ["train.lr=1e-2", "model.kind=mlp", "model.mlp.hidden=[64, 32]",
                                             "orchestration.train_pool=gpu"])
    assert (cfg.train.lr, cfg.model.kind, cfg.model.mlp.hidden) == (0.01, "mlp", [64, 32])
    assert cfg.orchestration.train_pool == "gpu"
    assert cfg.flat()["train.lr"] == 0.01


def test_int_is_accepted_for_float_and_digest_changes():
    a = config.from_dict({"train": {"lr": 1}})
    assert a.train.lr == 1.0 and isinstance(a.train.lr, float)
    assert a.digest() != Config().digest()


def test_bad_yaml_and_missing_file_are_named(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="p.yaml: not valid YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        config.load(tmp_path / "nope.yaml")
    bad.write_text(yaml.safe_dump({"train": 3}))
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        config.load(bad)


def test_cli_exits_2_before_any_work(workdir):
    res = cli("prepare", "--set", "train.lr=-1")
    assert res.exit_code == 2
    assert "train.lr" in res.stderr and "-1" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (workdir / "data").exists()


def test_cli_process_exit_code_is_2(workdir):
    """The installed console script, as a user runs it."""
    out = subprocess.run([sys.executable, "-m", "imgclf.cli", "download", "--set", "data.val_fraction=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "data.val_fraction" in out.stderr


def test_per_kind_train_defaults_sit_under_explicit_overrides():
    base = config.load(REPO / "params.yaml")
    mlp = config.load(REPO / "params.yaml", ["model.kind=mlp"])
    assert mlp.train.lr == base.model.mlp.train["lr"] != base.train.lr
    assert mlp.train.batch_size == base.train.batch_size  # untouched keys come from train
    assert config.load(REPO / "params.yaml", ["model.kind=mlp", "train.lr=0.05"]).train.lr == 0.05
    with pytest.raises(ConfigError, match=r"^model.mlp.train.lr: must be > 0"):
        config.from_dict({}, {"model.kind": "mlp", "model.mlp.train": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"^model.cnn.train.bogus: unknown key"):
        config.from_dict({}, {"model.cnn.train": {"bogus": 1}})
