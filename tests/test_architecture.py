"""The code's shape, checked: stages that load without Prefect, dvc.yaml deps complete by construction,
one source of truth for prepare's inputs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # noqa: F401  (torch's first import runs ldconfig, a subprocess the unit guard refuses in a test)
import yaml

from imgclf import config

from .helpers import REPO, TINY_OVERRIDES, make_mnist_dir, write_params

ORCHESTRATION = ("prefect", "flows", "tasks")

# Run a dvc.yaml command as `python -m imgclf.cli ...` and record every imgclf module file it imported.
RECORD = (
    "import atexit, json, runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "def dump():\n"
    "    files = sorted({m.__file__ for n, m in list(sys.modules.items()) if getattr(m, '__file__', None)\n"
    "                    and (n.split('.')[0] == 'imgclf' or n == '__main__')})\n"
    "    open(out, 'w').write(json.dumps(files))\n"
    "atexit.register(dump)\n"
    "sys.argv[0] = 'imgclf'\n"
    "runpy.run_module('imgclf.cli', run_name='__main__')\n"
)


@pytest.mark.integration
def test_every_stage_and_the_cli_load_without_prefect():
    """At run time (the static layering is import-linter's contract in pyproject.toml, run by scripts/test)."""
    code = ("import sys, imgclf.cli, imgclf.stages.download, imgclf.stages.prepare, imgclf.stages.train, "
            "imgclf.stages.evaluate, imgclf.stages.register, imgclf.stages.predict, imgclf.tracking.remote, "
            "imgclf.sweep.stage\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {ORCHESTRATION!r})\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def uncovered(deps: list[str], module_files: list[str], repo: Path) -> list[str]:
    """The imported library files no dep (a file or a folder above it) covers."""
    missing = []
    for f in module_files:
        rel = Path(f).resolve().relative_to(repo).as_posix()
        if not any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps):
            missing.append(rel)
    return sorted(missing)


# What a stage imports but does not compute its result with: how it runs, never what it makes. dvc.yaml leaves
# these out, so editing one never makes `dvc repro` retrain (tests/test_dvc.py edits one and checks).
HOW_NOT_WHAT = {
    "src/imgclf/__init__.py": "the package marker; how OpenMP's idle threads wait",
    "src/imgclf/cli": "argument parsing, messages, exit codes",
    "src/imgclf/console.py": "what a terminal shows",
    "src/imgclf/progress.py": "progress bars and their rate",
    "src/imgclf/locks.py": "one writer per folder",
    "src/imgclf/files.py": "atomic writes and content hashes",
    "src/imgclf/layout.py": "where the files live (paths)",
    "src/imgclf/urls.py": "URLs fit to print",
    "src/imgclf/stages/__init__.py": "the lock and the dvc.lock record around a stage",
    "src/imgclf/config/environment.py": "runtime and paths",
    "src/imgclf/config/moved.py": "refusing old key spellings",
    "src/imgclf/monitoring/settings.py": "batch inference's section",
    "src/imgclf/sweep/settings.py": "the sweep's section",
    "src/imgclf/serve/settings.py": "the online service's section",
    "src/imgclf/audit/settings.py": "the audit's section (the audit stage lists its whole package)",
    "src/imgclf/audit/__init__.py": "a docstring",
    "src/imgclf/serve/__init__.py": "a docstring",
    "src/imgclf/config/params_file.py": "reading YAML safely (its values are dvc.yaml's params)",
    "src/imgclf/schema.py": "validating params (their values are dvc.yaml's params)",
    "src/imgclf/config/settings.py": "the sections' container, folder checks, digest",
    "src/imgclf/data/__init__.py": "the prepared files' names",
    "src/imgclf/evaluation/__init__.py": "a docstring",
    "src/imgclf/monitoring/__init__.py": "a docstring",
    "src/imgclf/registry/__init__.py": "a docstring",
    "src/imgclf/sweep/__init__.py": "a docstring",
    "src/imgclf/tracking/__init__.py": "a docstring",
    "src/imgclf/training/__init__.py": "a docstring",
    "src/imgclf/training/runtime.py": "cores, device, the process group",
    "src/imgclf/tracking/journal.py": "MLflow records",
    "src/imgclf/tracking/lineage.py": "MLflow records",
    "src/imgclf/tracking/mlflow_internals.py": "MLflow records",
    "src/imgclf/tracking/runs.py": "MLflow records",
    "src/imgclf/tracking/store.py": "MLflow records",
    "src/imgclf/tracking/ui_view.py": "MLflow records",
}
# prepare validates every model kind's params (config reads the registry) but never builds a model.
NOT_READ_FOR_THE_RESULT = {"prepare": ["src/imgclf/models"]}


def _stage_deps() -> dict[str, list[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: [d if isinstance(d, str) else next(iter(d)) for d in s.get("deps", [])] for name, s in stages.items()}


def test_dvc_yaml_deps_leave_out_only_what_does_not_decide_a_result():
    deps = _stage_deps()
    for name, listed in deps.items():
        assert not set(listed) & set(HOW_NOT_WHAT), name
        assert all((REPO / d).exists() for d in listed if d.startswith("src/")), name
    assert all((REPO / path).exists() for path in HOW_NOT_WHAT)


@pytest.mark.slow
def test_dvc_yaml_declares_every_module_each_stage_imports(tmp_path):
    """Run each dvc.yaml stage's own command on tiny data; every imgclf module it imported is a dep, or one of
    the modules that say how it runs (HOW_NOT_WHAT)."""
    work = tmp_path / "work"
    work.mkdir()
    make_mnist_dir(work / "data/raw/mnist", n_train=200, n_test=60)
    write_params(work / "params.yaml", {**TINY_OVERRIDES, "train.max_epochs": 1, "runtime.tracking.enabled": True,
                                        "paths.mlflow_dir": str(tmp_path / "store"), "paths.dvc_file": None})
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    deps = _stage_deps()
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    for name, stage in stages.items():
        cmd = stage["cmd"].split()
        assert cmd[0] == "imgclf", f"{name}: expected an imgclf command, got {stage['cmd']}"
        record = tmp_path / f"{name}.json"
        out = subprocess.run([sys.executable, "-c", RECORD, str(record), *cmd[1:]], cwd=work, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{name}: {out.stderr[-3000:]}"
        imported = json.loads(record.read_text())
        assert any(f.endswith(f"stages/{name}.py") for f in imported), f"{name}: its stage module was not imported"
        missing = uncovered([*deps[name], *HOW_NOT_WHAT, *NOT_READ_FOR_THE_RESULT.get(name, [])], imported, REPO)
        assert missing == [], f"dvc.yaml stage {name} misses these deps: {missing}"
        # The check bites: drop the stage's own module from its deps and it is reported.
        own = f"src/imgclf/stages/{name}.py"
        assert own in uncovered([d for d in deps[name] if d != own], imported, REPO)


def test_runtime_and_paths_never_reach_the_result_records(tmp_path):
    """dvc.yaml's params, prepare's cache key, meta.json's params, the digest and MLflow's params all change
    with a result setting and none of them with a runtime or path setting."""
    from tasks.stages import prepare_cache_key

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    listed = [p for name, s in stages.items() for p in s.get("params") or [] if (name, p) != ("audit", "audit")]
    assert listed and all(p.split(".")[0] in config.RESULT_SECTIONS for p in listed), listed  # audit: its own only
    assert stages["prepare"]["params"] == ["data"]
    base = config.load(REPO / "params.yaml")

    def with_(**over):
        return config.from_dict(base.to_dict(), over)

    runtime = {"runtime.download.timeout_s": 5.0, "runtime.download.mirrors": ["http://127.0.0.1:1/"],
               "runtime.threads": 1, "runtime.device": "cpu", "paths.models_dir": "elsewhere",
               "runtime.tracking.experiment": "other", "paths.raw_dir": "r2"}
    for key, value in runtime.items():
        other = with_(**{key: value})
        assert other.digest() == base.digest() and other.flat() == base.flat(), key
        assert prepare_cache_key(None, {"cfg": other}).startswith("prepare-")
    key = lambda c: prepare_cache_key(None, {"cfg": c})  # noqa: E731
    assert key(base) == key(with_(**{"runtime.download.retries": 9}))
    assert key(base) != key(with_(**{"data.seed": 1})) != key(with_(**{"data.val_fraction": 0.1}))
    assert with_(**{"train.lr": 0.1}).digest() != base.digest()
    make_mnist_dir(tmp_path / "raw/mnist", n_train=50, n_test=20)
    from imgclf.data.splits import prepare

    meta = prepare(base.data, tmp_path / "raw", tmp_path / "processed")
    assert meta["params"] == dataclasses.asdict(base.data)


@pytest.mark.slow
def test_wheel_ships_only_the_library(tmp_path):
    import zipfile

    out = subprocess.run(["uv", "build", "--wheel", "-o", str(tmp_path), str(REPO)], capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0 and "uv" not in out.stderr:
        pytest.fail(out.stderr[-2000:])
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("*.whl"))
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert "imgclf" in tops and not tops & {"flows", "tasks", "tests", "bench"}, tops


def test_the_guide_lists_every_package_and_module_of_the_library():
    """docs/layout.md's package list is the folders of src/imgclf/, each bullet naming every module in it."""
    import re

    text = (REPO / "docs/layout.md").read_text()
    listed = text[text.index("<!-- packages: begin -->"):text.index("<!-- packages: end -->")]
    bullets = {m.group(1): m.group(0) for m in re.finditer(r"(?ms)^- `(\w+)/`:.*?(?=^- `|\Z)", listed)}
    library = REPO / "src" / "imgclf"
    packages = {p.parent.name: p.parent for p in library.glob("*/__init__.py")}
    assert sorted(bullets) == sorted(packages)
    for name, folder in packages.items():
        modules = {p.stem for p in folder.glob("*.py")} - {"__init__", "__main__"}
        named = set(re.findall(r"`(\w+)`", bullets[name]))
        assert modules <= named, f"docs/layout.md, {name}/: {sorted(modules - named)} not named"
    for module in library.glob("*.py"):
        assert module.stem == "__init__" or f"`{module.stem}`" in text, module.name
