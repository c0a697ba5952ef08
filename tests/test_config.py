import dataclasses
import subprocess
import sys

import pytest
import yaml

from imgclf import config
from imgclf.config import Config, ConfigError
from imgclf.config.params_file import read_params
from imgclf.models import KINDS

from .helpers import REPO, cli


def test_repo_params_are_the_defaults():
    assert config.load(REPO / "params.yaml") == config.from_dict({})
    assert Config().runtime == config.load(REPO / "params.yaml").runtime


@pytest.mark.parametrize("source, kind, want", [
    ("mnist", "cnn", {"max_epochs": 12, "augment_shift": 2, "augment_flip": False, "lr": 0.004}),
    ("fashion-mnist", "cnn", {"max_epochs": 16, "augment_shift": 1, "augment_flip": True, "lr": 0.004}),
    ("mnist", "mlp", {"max_epochs": 24, "augment_shift": 1, "augment_flip": False, "lr": 0.001}),
])
def test_the_training_settings_are_resolved_once_with_no_none_left(source, kind, want):
    cfg = config.load(REPO / "params.yaml", [f"data.source={source}", f"model.kind={kind}"])
    got = dataclasses.asdict(cfg.train)
    assert None not in got.values()
    assert {k: got[k] for k in want} == want
    assert {f"train.{k}": v for k, v in got.items()}.items() <= cfg.flat().items()


def test_a_written_value_wins_for_every_kind_and_a_null_is_the_kinds_then_the_sources():
    for kind in KINDS:
        assert config.from_dict({"train": {"lr": 0.05, "max_epochs": 5}}, {"model.kind": kind}).train.lr == 0.05
        assert config.load(REPO / "params.yaml", [f"model.kind={kind}", "train.max_epochs=5"]).train.max_epochs == 5
        assert config.from_dict({}, {"model.kind": kind}).train.lr == KINDS[kind].train_defaults["lr"]
    mlp = config.from_dict({"train": {"augment_shift": 3}}, {"model.kind": "mlp"}).train
    assert (mlp.augment_shift, mlp.max_epochs, mlp.lr) == (3, 24, 0.001)  # written; the kind's; the kind's
    assert config.from_dict({}, {"model.kind": "cnn"}).train.max_epochs == 12  # no kind value: the source's
    # `--set train.lr=null` asks for the default back
    assert config.from_dict({"train": {"lr": 0.05}}, {"model.kind": "mlp", "train.lr": None}).train.lr == 0.001


def test_every_default_is_written_once_and_params_yaml_writes_the_same_values_out():
    """The dataclasses are the one home of a default; params.yaml lists every key with that very value."""
    def leaves(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and key != "space":
                out.update(leaves(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    written = leaves(read_params(REPO / "params.yaml"))
    defaults = leaves(dataclasses.asdict(config.build(config.Config, {})))
    assert sorted(written) == sorted(defaults)
    # YAML 1.1 reads an unquoted `off` as false, and the schema reads it back as "off" (dvc exp run -S writes it
    # unquoted whatever the file had).
    assert {k: v for k, v in written.items() if v != defaults[k] and not (v is False and defaults[k] == "off")} == {}
    # A kind or a source decides only keys that the train section leaves null by default: otherwise the value
    # params.yaml writes out would always beat it.
    nullable = {k for k, v in dataclasses.asdict(config.TrainConfig()).items() if v is None}
    for name, kind in KINDS.items():
        assert "lr" in kind.train_defaults and set(kind.train_defaults) <= nullable, name
        config.build(config.TrainConfig, kind.train_defaults, f"imgclf.models.{name}.TRAIN_DEFAULTS")


def test_an_old_style_params_file_is_refused_with_one_line_per_moved_key(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({
        "data": {"source": "mnist", "raw_dir": "data/raw", "download_retries": 3},
        "train": {"lr": 0.01, "threads": 2, "out_dir": "models"},
        "model": {"cnn": {"train": {"device": "cpu"}}},
        "tracking": {"store_dir": "mlflow"}, "orchestration": {}, "register": {"min_accuracy": 0.9}}))
    with pytest.raises(ConfigError) as exc:
        config.load(old)
    lines = str(exc.value).splitlines()
    assert "8 key(s) moved" in lines[0] and str(old) in lines[0]
    moved = dict(line.strip().split(": moved to ") for line in lines[1:])
    assert moved == {"data.raw_dir": "paths.raw_dir", "data.download_retries": "runtime.download.retries",
                     "train.threads": "runtime.threads", "train.out_dir": "paths.models_dir",
                     "model.cnn.train.device": "runtime.device", "tracking.store_dir": "paths.mlflow_dir",
                     "orchestration": "runtime.orchestration",
                     "register.min_accuracy": "register.min_score (with register.metric: accuracy)"}
    with pytest.raises(ConfigError, match=r"--set train.threads: moved to runtime.threads"):
        config.load(REPO / "params.yaml", ["train.threads=1"])


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
    ({"runtime.download.mirrors": []}, "runtime.download.mirrors"),
])
def test_rejected_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as exc:
        config.from_dict({}, override)
    assert str(exc.value).startswith(key), str(exc.value)


def test_overrides_parse_yaml_scalars():
    cfg = config.load(REPO / "params.yaml", ["train.lr=1e-2", "model.kind=mlp", "model.mlp.hidden=[64, 32]",
                                             "runtime.orchestration.train_pool=gpu"])
    assert (cfg.train.lr, cfg.model.kind, cfg.model.mlp.hidden) == (0.01, "mlp", [64, 32])
    assert cfg.runtime.orchestration.train_pool == "gpu"
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


@pytest.mark.integration
def test_cli_process_exit_code_is_2(workdir):
    """The installed console script, as a user runs it."""
    out = subprocess.run([sys.executable, "-m", "imgclf.cli", "download", "--set", "data.val_fraction=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "data.val_fraction" in out.stderr


def test_the_old_per_kind_train_section_is_refused_with_its_new_spelling():
    with pytest.raises(ConfigError) as exc:
        config.from_dict({"model": {"mlp": {"train": {"lr": 0.001}}, "cnn": {"train": {}}}})
    assert "model.mlp.train.lr: moved to train.lr (a value there wins for every kind" in str(exc.value)
    assert "model.cnn.train: moved to train (" in str(exc.value)
    with pytest.raises(ConfigError, match=r"--set model.mlp.train.lr: moved to train.lr"):
        config.from_dict({}, {"model.mlp.train.lr": 0.05})


def test_the_logged_params_of_the_default_cnn_are_the_resolved_values():
    from imgclf.tracking.lineage import flat_params

    cfg = config.load(REPO / "params.yaml")
    params = flat_params(cfg)
    assert "None" not in params.values()
    assert (params["train.max_epochs"], params["train.augment_shift"], params["train.augment_flip"]) == ("12", "2", "False")
    assert params["register.model_name"] == "imgclf-mnist" and params["model.kind"] == "cnn"
    assert not any(k.startswith(("runtime.", "paths.", "model.mlp.")) for k in params)


@pytest.mark.integration
def test_dvc_exp_run_set_changes_one_line_of_params_yaml(tmp_path):
    """params.yaml is written as DVC writes it (empty nulls, block lists), so `dvc exp run -S` leaves a one-line
    diff, not a reformatted file."""
    import shutil

    def run(*args):
        out = subprocess.run(list(args), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out.stdout

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo ran > out.txt\n    params: [train]\n"
                                       "    outs: [out.txt]\n")
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params")
    run(sys.executable, "-m", "dvc", "exp", "run", "-q", "-S", "train.max_epochs=3", "-S", "train.lr=0.05")
    diff = [line for line in run("git", "diff", "-U0", "params.yaml").splitlines()
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert sorted(line[0] + line[1:].split("#")[0].strip() for line in diff) == \
        ["+lr: 0.05", "+max_epochs: 3", "-lr:", "-max_epochs:"], diff
    assert config.load(tmp_path / "params.yaml").train.max_epochs == 3


def test_an_inbox_that_holds_a_project_is_refused(tmp_path, monkeypatch):
    """monitor.inbox is emptied by the batch-inference flow: a git or DVC project there is not an inbox."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere" / ".git").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"monitor.inbox: .* holds a project \(.git\)"):
        config.from_dict({}, {"monitor.inbox": str(tmp_path / "elsewhere")})
    assert config.from_dict({}, {"monitor.inbox": "incoming"}).monitor.inbox == "incoming"


def test_an_unquoted_off_is_the_severity_off():
    """`balance: off` as written in params.yaml's comments: YAML 1.1 reads it as false, the check means off."""
    raw = read_params_text("data:\n  checks:\n    balance: off\n    duplicates: warn\n")
    checks = config.from_dict(raw).data.checks
    assert (checks.balance, checks.duplicates) == ("off", "warn")
    with pytest.raises(ConfigError, match="data.checks.balance: must be one of error, warn, off; got True"):
        config.from_dict(read_params_text("data:\n  checks:\n    balance: on\n"))


def read_params_text(text: str) -> dict:
    from imgclf.config.params_file import parse_yaml

    return parse_yaml(text)
