"""Hostile input and exposure: no registry entry, params file or network peer can run code, hang a stage
or expose a server. Real files, processes and servers throughout."""

from __future__ import annotations

import gc
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import mlflow
from imgclf.data.fetch import DownloadError, download_files

from .helpers import cli, free_port, make_mnist_dir, wait_http

pytestmark = pytest.mark.integration  # real servers, processes or stores: see conftest's layers


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and its size and mtime; the stages' folder locks (.<folder>.lock, no content) aside."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr and "weights_only=False" not in stderr, stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


# -- params parsing: bounded, strict, exit 2 naming the key ---------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

PARAMS_CASES = {
    "alias bomb": (BOMB.encode(), [], "anchors/aliases are not allowed"),
    "a list": (b"- data\n- train\n", [], "top level must be a mapping"),
    "an empty file": (b"", [], "params.yaml: empty (no section)"),
    "only comments": (b"# nothing\n", [], "params.yaml: empty (no section)"),
    "a scalar": (b"42\n", [], "top level must be a mapping"),
    "not UTF-8": (b"train:\n  lr: \xff\xfe\n", [], "not UTF-8"),
    "duplicate key": (b"train:\n  lr: 0.1\ntrain:\n  lr: 0.2\n", [], "train: duplicate key"),
    "duplicate nested key": (b"train:\n  lr: 0.1\n  lr: 0.2\n", [], "lr: duplicate key"),
    "NaN in file": (b"train:\n  lr: .nan\n", [], "train.lr: must be a finite number"),
    "inf override": (b"{}\n", ["train.lr=.inf"], "train.lr: must be a finite number"),
    "inf timeout": (b"{}\n", ["runtime.download.timeout_s=.inf"], "runtime.download.timeout_s"),
    "inactive kind key": (b"{}\n", ["model.mlp.foo=1"], "model.mlp.foo: unknown key"),
    "inactive kind bad value": (b"model:\n  kind: cnn\n  mlp:\n    dropout: -1\n", [], "model.mlp.dropout"),
    "old per-kind train": (b"{}\n", ["model.mlp.train.lr=0.1"], "old-style params: 1 key(s) moved"),
    "anchor in override": (b"{}\n", ["train.lr=&x 1"], "train.lr: cannot parse value"),
    "huge file": (b"#" * (2 << 20), [], "larger than"),
    "nested 1000 deep": (b"train:\n  lr: " + b"[" * 1000 + b"]" * 1000 + b"\n", [], "nested deeper than 32"),
    "nested 1000 deep override": (b"{}\n", ["train.lr=" + "[" * 1000 + "]" * 1000], "nested deeper than 32"),
    "a billion units": (b"{}\n", ["model.mlp.hidden=[1000000000]"], "model.mlp.hidden: every entry must be > 0 and <= 65536"),
    "five thousand layers": (b"model:\n  mlp:\n    hidden: [" + b", ".join([b"8"] * 5_000) + b"]\n", [],
                              "model.mlp.hidden: at most 64 entries (a layer each), got 5000"),
    "huge seed": (b"{}\n", [f"train.seed={10**26}"], "train.seed: must be <= 4294967295"),
    "negative seed": (b"data:\n  seed: -5\n", [], "data.seed: must be >= 0"),
    "processed_dir over raw_dir": (b"{}\n", ["paths.processed_dir=data"], "paths.processed_dir: 'data' overlaps paths.raw_dir"),
    "model name with a quote": (b"{}\n", ["register.model_name=a'b"], "register.model_name: letters, digits"),
    # the batch-inference flow moves what it scores out of the inbox: never the checkout, home, or the data
    "inbox is the checkout": (b"{}\n", ["monitor.inbox=."], "monitor.inbox: '.' is the working directory or above it"),
    "inbox above the checkout": (b"{}\n", ["monitor.inbox=.."], "monitor.inbox: '..' is the working directory"),
    "inbox is home": (b"{}\n", [f"monitor.inbox={Path.home()}"], "is the home folder or above it"),
    "inbox in the raw data": (b"{}\n", ["monitor.inbox=data/raw/mnist"], "'data/raw/mnist' overlaps paths.raw_dir"),
    "processed_dir is the checkout": (b"{}\n", ["paths.processed_dir=."], "is the working directory or above it"),
}


@pytest.mark.parametrize("case", list(PARAMS_CASES))
def test_bad_params_exit_2_naming_the_key_fast(case, tmp_path, monkeypatch):
    content, overrides, expected = PARAMS_CASES[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_bytes(content)
    before = _snapshot(tmp_path)
    args = ["prepare"] + [a for o in overrides for a in ("--set", o)]
    # CPU time of this thread, not wall time: "fast" means no work done before the refusal (no torch, no data).
    # Not the process's CPU time either: threads an earlier test in this worker left (a server's event loop) count
    # there, and once took it from 0.12 s to 1.10 s in CI. Nor the garbage collector's: a full collection over
    # what earlier tests in this worker left, set off by the parser's allocations, once took it to 1.02 s.
    gc.collect()
    gc.disable()
    try:
        start = time.thread_time()
        res = cli(*args)
        elapsed = time.thread_time() - start
    finally:
        gc.enable()
    assert res.exit_code == 2, res.output
    line = _one_error_line(res.stderr)
    assert expected in line, line
    assert elapsed < 1.0, f"{case}: {elapsed:.2f}s of CPU"
    assert _snapshot(tmp_path) == before


def test_a_params_fifo_is_refused_without_blocking(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "params.fifo")
    start = time.perf_counter()
    res = cli("prepare", "--params", "params.fifo")
    assert res.exit_code == 2 and "params.fifo: not a regular file" in _one_error_line(res.stderr)
    assert time.perf_counter() - start < 1.0


def test_params_edited_while_a_stage_runs_fail_it(tiny_workdir):
    """The stage used the values read at its start: it exits 1 rather than let `dvc repro` record the
    edited ones in dvc.lock as if its outputs came from them."""
    import yaml

    params = tiny_workdir / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["train"]["max_epochs"] = 60
    params.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "imgclf.cli", "train"], cwd=tiny_workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tiny_workdir / "models/checkpoint.pt").exists():  # the first epoch is done: it is running
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raw["train"]["max_epochs"] = 2
    params.write_text(yaml.safe_dump(raw))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    assert "params.yaml: changed while train ran" in _one_error_line(err)


def test_prepare_never_replaces_a_folder_it_did_not_write(tiny_workdir):
    """A user's folder named as paths.processed_dir is refused before any work, its files untouched;
    a run killed during the swap leaves temp folders that the next run removes."""
    mine = tiny_workdir / "my-notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = _snapshot(tiny_workdir)
    res = cli("prepare", "--set", f"paths.processed_dir={mine.name}")
    assert res.exit_code == 1, res.output
    line = _one_error_line(res.stderr)
    assert "my-notes: holds files this stage did not write" in line, line
    assert _snapshot(tiny_workdir) == before

    # SIGKILL mid-swap: the last version moved aside, the new one not yet in place, a temp folder left.
    processed = tiny_workdir / "data/processed"
    meta = (processed / "meta.json").read_text()
    os.replace(processed, processed.with_name(".processed.old"))
    (tiny_workdir / "data/.processed.k1ll3d.tmp").mkdir()
    (tiny_workdir / "data/.processed.k1ll3d.tmp/train.pt").write_bytes(b"half")
    assert cli("prepare").exit_code == 0
    assert (processed / "meta.json").read_text() == meta
    assert sorted(p.name for p in (tiny_workdir / "data").iterdir() if p.name.startswith(".processed")) == [
        ".processed.lock"]


# -- one-line errors for damaged files and malformed URIs: exit 1, nothing written -------------------------

class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _damage(workdir: Path, case: str, marker: Path) -> None:
    import torch

    if case == "pickle payload in train.pt":
        torch.save({"images": _Payload(str(marker))}, workdir / "data/processed/train.pt")
    elif case == "truncated train.pt":
        p = workdir / "data/processed/train.pt"
        p.write_bytes(p.read_bytes()[:1000])
    else:  # a replaced best.pt with a run.json to match, so only the file itself can give it away
        (workdir / "models").mkdir(exist_ok=True)
        best = workdir / "models/best.pt"
        if case == "garbage best.pt":
            best.write_bytes(b"\x80\x04not a model")
        else:
            torch.save(_Payload(str(marker)), best)
        data = json.loads((workdir / "data/processed/meta.json").read_text())["sha256"]
        (workdir / "models/run.json").write_text(json.dumps(
            {"run_id": None, "best_sha256": hashlib.sha256(best.read_bytes()).hexdigest(), "data_sha256": data}))


FILE_CASES = {
    "pickle payload in train.pt": ("train", "data/processed/train.pt"),
    "truncated train.pt": ("train", "data/processed/train.pt"),
    "garbage best.pt": ("evaluate", "models/best.pt"),
    "payload best.pt": ("evaluate", "models/best.pt"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_damaged_files_are_one_line_naming_the_file(case, tiny_workdir, tmp_path):
    marker = tmp_path / "payload-ran"
    _damage(tiny_workdir, case, marker)
    before = _snapshot(tiny_workdir)
    stage, name = FILE_CASES[case]
    res = cli(stage)
    assert res.exit_code == 1, res.output
    assert name in _one_error_line(res.stderr)
    assert not marker.exists()
    assert _snapshot(tiny_workdir) == before


URI_CASES = [":::", "models:/", "models:/a b@x", "runs:/not-a-run-id/model", "models:/m@", "\x00evil"]


@pytest.mark.parametrize("uri", URI_CASES)
def test_malformed_model_uris_are_refused_before_anything(uri, tmp_path, monkeypatch, tiny_workdir):
    img = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(img)
    before = _snapshot(tiny_workdir)
    res = cli("predict", str(img), "--model-uri", uri)
    assert res.exit_code == 1, res.output
    assert "not a model URI" in _one_error_line(res.stderr)
    assert _snapshot(tiny_workdir) == before and not (tiny_workdir / "mlflow").exists()


def test_predict_checks_every_image_before_loading_a_model(tiny_workdir, tmp_path):
    good = tmp_path / "ok.png"
    Image.new("L", (28, 28)).save(good)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for bad, expected in ((text, "not an image"), (tmp_path / "missing.png", "no such file")):
        start = time.perf_counter()
        res = cli("predict", str(good), str(bad))  # the production model does not even exist here
        assert res.exit_code == 1 and f"{bad}: {expected}" in _one_error_line(res.stderr)
        assert time.perf_counter() - start < 5
    assert not (tiny_workdir / "mlflow").exists()  # no store opened, no model fetched


def test_verbose_shows_the_chained_traceback(tiny_workdir):
    (tiny_workdir / "models").mkdir(exist_ok=True)
    (tiny_workdir / "models/best.pt").write_bytes(b"garbage")
    res = cli("evaluate", "-v")
    assert res.exit_code == 1 and "Traceback" in res.stderr and res.stderr.strip().splitlines()[-1].startswith("error:")


# -- the project never unpickles a model ------------------------------------------------------------------

class _Identity(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


def _register_pickle_payload(client, name: str, experiment: str, marker: Path, tmp_path: Path) -> str:
    """A pyfunc model whose python_model.pkl runs `touch marker` when unpickled, as a new version."""
    import pickle

    folder = tmp_path / "evil-model"
    mlflow.pyfunc.save_model(str(folder), python_model=_Identity())
    (folder / "python_model.pkl").write_bytes(pickle.dumps(_Payload(str(marker))))  # dumps runs nothing
    assert not marker.exists()
    exp = client.get_experiment_by_name(experiment)
    run = client.create_run(exp.experiment_id, run_name="attacker")
    client.log_artifacts(run.info.run_id, str(folder), "evil")
    client.set_terminated(run.info.run_id)
    return client.create_model_version(name, f"runs:/{run.info.run_id}/evil", run_id=run.info.run_id).version


@pytest.mark.slow
def test_pickle_payload_model_in_production_never_runs(tracked_workdir, mlflow_server, tmp_path):
    from imgclf import config

    cfg = config.load("params.yaml")
    name, client = cfg.model_name, mlflow.MlflowClient(mlflow_server, mlflow_server)
    for stage in ("train", "evaluate", "register"):
        assert cli(stage).exit_code == 0
    marker = tmp_path / "payload-ran"
    evil = _register_pickle_payload(client, name, cfg.tracking.experiment, marker, tmp_path)
    assert not marker.exists(), "registering ran it"
    moved = cli("promote", "--version", evil, "--reason", "an attacker with registry access")
    assert moved.exit_code == 0, moved.output
    assert not marker.exists(), "promoting ran it"

    img = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(img)
    res = cli("predict", str(img))
    assert not marker.exists(), "predict ran it"
    line = _one_error_line(res.stderr)
    assert res.exit_code == 1 and f"models:/{name}@production" in line and "refused" in line, line
    local = tmp_path / "evil-model"
    res = cli("predict", str(img), "--model-uri", str(local))
    assert res.exit_code == 1 and "refused" in _one_error_line(res.stderr)

    # The promotion gate re-scores production: it must refuse the payload too, and not promote blindly.
    for stage in ("train", "evaluate"):
        assert cli(stage).exit_code == 0
    reg = cli("register")
    assert reg.exit_code == 0, reg.output
    decision = json.loads(reg.stdout)
    assert not decision["promoted"] and "could not be scored" in decision["reason"] and "refused" in decision["reason"]
    assert client.get_model_version_by_alias(name, "production").version == evil  # a person decides
    assert not marker.exists()
    # The payload was live: plain unpickling of that file does run it.
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(local / 'python_model.pkl')!r}, 'rb'))"],
                   check=False, capture_output=True, timeout=60)
    assert marker.exists()


# -- servers are never exposed without authentication ---------------------------------------------------------

def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def test_ui_refuses_to_expose_mlflow_without_auth(workdir):
    port = free_port()
    bare = {k: v for k, v in os.environ.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"}
    with_password = {**bare, "MLFLOW_AUTH_ADMIN_PASSWORD": "x" * 16}
    cases = ((["--host", "0.0.0.0"], bare, "--auth"),
             (["--host", "0.0.0.0", "--auth", "--allowed-host", "mlflow.example"], bare, "MLFLOW_AUTH_ADMIN_PASSWORD"),
             (["--host", "0.0.0.0", "--auth"], with_password, "--allowed-host"),
             (["--host", "0.0.0.0", "--auth", "--allowed-host", "*"], with_password, "--allowed-host '*'"),
             (["--allowed-host", "*.example.com"], bare, "a wildcard turns the DNS-rebinding guard off"))
    for args, env, expected in cases:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "imgclf.cli", "ui", "--port", str(port), *args], cwd=workdir,
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and expected in _one_error_line(out.stderr), out.stderr
        assert time.perf_counter() - start < 30 and _port_is_free(port)


@pytest.mark.slow
def test_ui_with_auth_answers_401_without_credentials(workdir):
    """And a restart with a new MLFLOW_AUTH_ADMIN_PASSWORD changes the admin's password: the old one is
    refused, the new one accepted (MLflow itself sets it only when it creates the user)."""
    import base64
    import secrets
    import signal

    def status(url: str, user_password: str | None) -> int:
        headers = {"Authorization": "Basic " + base64.b64encode(user_password.encode()).decode()} if user_password else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    old = None
    for password in (secrets.token_urlsafe(18), secrets.token_urlsafe(18)):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "imgclf.cli", "ui", "--port", str(port), "--auth"], cwd=workdir,
                                env={**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": password},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=120)
            url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
            assert status(url, None) == 401 and status(url, "admin:nope") == 401
            assert status(url, f"admin:{password}") == 200
            if old is not None:
                assert status(url, f"admin:{old}") == 401, "the previous password still works"
            ini = workdir / "mlflow/auth/basic_auth.ini"
            assert oct(ini.stat().st_mode & 0o777) == "0o600" and password not in ini.read_text()
            users = workdir / "mlflow/auth/basic_auth.db"  # the password hashes, after MLflow made its tables
            assert oct(users.stat().st_mode & 0o777) == "0o600" and users.stat().st_size > 0
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        old = password


# -- downloads have a deadline per file -----------------------------------------------------------------------

class TrickleServer:
    """Announces a large file, then sends one byte every `every` seconds, forever."""

    def __init__(self, every: float = 0.2):
        stop = self.stop_event = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(10**7))
                self.end_headers()
                while not stop.is_set():
                    try:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(every)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_trickling_mirror_hits_the_deadline_then_the_next_mirror(tmp_path):
    src = tmp_path / "good"
    md5s = make_mnist_dir(src, n_train=20, n_test=10)
    one = [s for s in md5s if s.name == "train-images-idx3-ubyte.gz"]
    slow = TrickleServer()
    try:
        logs: list[str] = []
        start = time.perf_counter()
        with pytest.raises(DownloadError, match="deadline passed"):
            download_files(tmp_path / "raw", one, [slow.url], retries=2, timeout=5, deadline_s=1.0,
                           backoff_s=0, log=logs.append)
        assert time.perf_counter() - start < 6
        assert any("no mirror left" in m for m in logs) and not any("next mirror" in m for m in logs), logs
        assert not list((tmp_path / "raw").iterdir())  # nothing half-written

        logs.clear()
        got = download_files(tmp_path / "raw", one, [slow.url, str(src)], retries=1, timeout=5, deadline_s=1.0,
                             backoff_s=0, log=logs.append)
        assert got[0].mirror == str(src) and any("trying the next mirror" in m for m in logs), logs
    finally:
        slow.close()


def test_model_weights_that_do_not_fit_their_architecture_are_refused(tmp_path):
    """The safetensors fast path builds on the meta device and only accepts weights that fill it exactly."""
    import torch
    from safetensors.torch import save_file

    from imgclf import config
    from imgclf.models.classifier import architecture, from_architecture
    from imgclf.registry.model_files import ModelFormatError, rebuild

    arch = architecture(config.from_dict({}).model, [1, 28, 28], 10, [str(d) for d in range(10)],
                        {"mean": [0.5], "std": [0.5]})
    state = {k: v.contiguous() for k, v in from_architecture(arch).state_dict().items()}
    good = tmp_path / "good.safetensors"
    save_file(state, str(good))
    assert rebuild("ok", arch, good)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    first = next(iter(state))
    for name, weights in (("missing", {k: v for k, v in state.items() if k != first}),
                          ("reshaped", {**state, first: torch.zeros(3, 3)}),
                          ("huge claim", state)):
        path = tmp_path / f"{name}.safetensors"
        save_file(weights, str(path))
        bad_arch = {**arch, "model": {**arch["model"], "cnn": {**arch["model"]["cnn"], "channels": [4096, 4096]}}} \
            if name == "huge claim" else arch
        with pytest.raises(ModelFormatError, match="weights do not fit its architecture record"):
            rebuild(f"models:/{name}", bad_arch, path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelFormatError):
        rebuild("models:/junk", arch, tmp_path / "junk.safetensors")


@pytest.mark.integration
def test_imgclf_stop_signals_only_the_processes_it_started(tmp_path):
    """Records under .services/ are files anyone can edit: pid 0 (the caller's group), a real process of this
    user that imgclf did not start, a FIFO, a name pointing outside: each is named and left alone, and a real
    service beside them is still stopped."""
    import signal as signals

    from imgclf.ops import background

    state = tmp_path / ".services"
    state.mkdir()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    real, _ = background.start("mlflow-1", "mlflow", [sys.executable, "-c", "import time; time.sleep(120)"],
                               dict(os.environ), state_dir=state)
    try:
        ticks = background._start_ticks(bystander.pid)
        forged = {"pid0": {"pid": 0, "started": None, "cmd": ["x"]},  # /proc/0 has no start time: None == None
                  "other": {"pid": bystander.pid, "started": ticks, "cmd": [sys.executable, "-m", "imgclf.ops.mlflow_serve"]},
                  "named": {"pid": bystander.pid, "started": ticks, "cmd": bystander.args, "name": "../../victim"}}
        for name, fields in forged.items():
            record = {"name": name, "kind": "mlflow", "log": "x.log", **fields}
            (state / f"{name}.json").write_text(json.dumps(record))
        os.mkfifo(state / "fifo.json")
        (tmp_path / "victim.json").write_text("{}")
        # in a session of its own: were the caller's group signalled, this test would live on regardless
        out = subprocess.run([sys.executable, "-m", "imgclf.cli", "stop"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, start_new_session=True)
        assert out.returncode == 0, out.stderr
        assert "stopped mlflow-1" in out.stdout + out.stderr
        assert bystander.poll() is None, "a process imgclf did not start was signalled"
        said = out.stdout + out.stderr
        assert all(f"{name}.json: not a service record" in said for name in ("pid0", "fifo", "named")), said
        assert (tmp_path / "victim.json").exists()
        assert not background.alive(real)
    finally:
        bystander.send_signal(signals.SIGKILL)
        bystander.wait()
        background.stop(real, grace=1)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "javascript:alert(1)", "/etc/passwd"])
def test_imgclf_wait_takes_only_http_urls(url):
    result = cli("wait", url, "--timeout", "1")
    assert result.exit_code == 2 and "an http(s) URL is needed" in result.output, result.output
