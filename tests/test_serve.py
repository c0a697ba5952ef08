"""`imgclf serve` for real: the CLI started with --wait over a registered model in the embedded store, answered
over loopback HTTP. The same answers as `imgclf predict`, tensors as `mlflow models serve` takes them, a
promotion and a rollback under continuous load with no failed request, metrics, and every bad input a 4xx."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

from imgclf.data.synthetic import separable_digits

from .helpers import TINY_OVERRIDES, cli, free_port, registry_with_versions, write_params

pytestmark = pytest.mark.integration


def _post(url: str, body: bytes, content_type: str, timeout: float = 30) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read())


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "imgclf-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{n}"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for n, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _reply(sock: socket.socket) -> bytes:
    """A whole HTTP response off a raw socket: headers, then as many bytes as its Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _bomb() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels (900 M): PIL refuses it on opening."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def test_serve_answers_as_predict_follows_promotions_under_load_and_refuses_bad_input(tiny_workdir, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_params(tiny_workdir / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True,
                                                "register.min_score": 0.0, "train.max_epochs": 1})
    for seed in ("0", "1"):  # two versions: v1 promoted by the gate, v2 registered beside it
        for stage in ("train", "evaluate", "register"):
            res = cli(stage, "--set", f"train.seed={seed}")
            assert res.exit_code == 0, res.output
    images, _ = separable_digits(6, seed=7)
    files = []
    for i, img in enumerate(images):
        (tmp_path / f"digit-{i}.png").write_bytes(_png(img))
        files.append(tmp_path / f"digit-{i}.png")
    from imgclf import config
    from imgclf.stages.predict import predict_stage

    expected = predict_stage(config.load("params.yaml"), [str(f) for f in files])
    # what the challenger (v2) answers for the same files: the shadow must have seen exactly these pairs
    theirs = predict_stage(config.load("params.yaml"), [str(f) for f in files], "models:/imgclf-mnist/2")
    pairs = {(w["class"], t["class"]) for w, t in zip(expected, theirs)}

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    started = subprocess.run([sys.executable, "-m", "imgclf.cli", "serve", "--wait", "--port", str(port),
                              "--shadow", "challenger", "--set", "serve.poll_s=0.3", "--set", "serve.max_body_mb=1",
                              "--set", "serve.body_timeout_s=2", "--set", "serve.shadow.flush_s=1"],
                             cwd=tiny_workdir, env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as resp:
            assert json.loads(resp.read())["shadow"]["uri"] == "models:/imgclf-mnist/2"
        # The same classes and probabilities as `imgclf predict`, from files, a multipart batch and tensors.
        for f, want in zip(files, expected):
            status, headers, got = _post(f"{base}/predict", f.read_bytes(), "image/png")
            assert status == 200 and got["class"] == want["class"], got
            assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)
            assert headers["x-model-version"] == "1" and len(headers["x-model-weights-sha256"]) == 64
            assert got["model"]["uri"] == want["model"] == "models:/imgclf-mnist/1" and len(got["top_k"]) == 3
        body, kind = _multipart([(f.name, f.read_bytes()) for f in files])
        status, _, batch = _post(f"{base}/predict", body, kind)
        assert status == 200 and [p["class"] for p in batch["predictions"]] == [w["class"] for w in expected]
        assert [p["file"] for p in batch["predictions"]] == [f.name for f in files]
        tensors = (images[:, None].astype(np.float32) / 255.0).tolist()
        status, _, inv = _post(f"{base}/invocations", json.dumps({"inputs": tensors}).encode(), "application/json")
        assert status == 200
        assert np.allclose([max(row) for row in inv["predictions"]], [w["probability"] for w in expected], atol=1e-6)

        # Promotion and rollback while four clients send requests without a pause: none fails.
        seen, failures, stop = [], [], threading.Event()

        def client():
            data = files[0].read_bytes()
            while not stop.is_set():
                try:
                    status, headers, _ = _post(f"{base}/predict", data, "image/png")
                    (seen if status == 200 else failures).append(headers.get("x-model-version", status))
                except OSError as exc:
                    failures.append(repr(exc))

        clients = [threading.Thread(target=client) for _ in range(4)]
        for t in clients:
            t.start()
        try:
            time.sleep(1)
            assert cli("promote", "--version", "2").exit_code == 0
            deadline = time.monotonic() + 60
            while (not seen or seen[-1] != "2") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert seen[-1] == "2", "the service did not follow production to v2"
            assert cli("promote", "--rollback").exit_code == 0
            deadline = time.monotonic() + 60
            while seen[-1] != "1" and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in clients:
                t.join()
        assert not failures, failures[:5]
        # Four clients append as their answers arrive, so around a swap an answer of the old model may land
        # after one of the new: what holds is that v2 answered, and v1 before and after it.
        assert seen[0] == "1" and "2" in seen and seen[-1] == "1", seen
        print(f"\n{len(seen)} requests across a promotion and a rollback, none failed")
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert "imgclf_serve_model_swaps_total 2.0" in metrics
        assert 'imgclf_serve_model_info{name="imgclf-mnist",version="1"' in metrics and 'version="2"' not in metrics
        assert 'imgclf_serve_requests_total{endpoint="/predict",status="200"}' in metrics
        shadowed = float(re.search(r"^imgclf_serve_shadow_images_total (\S+)$", metrics, re.M).group(1))
        assert shadowed > 0, "the shadow scored nothing"

        # Bad input: a 4xx with one line of JSON, and the next good request succeeds.
        good = files[0].read_bytes()
        bad = [(b"not an image at all", "image/png", 400, "not an image"),
               (_bomb(), "image/png", 413, "too many pixels"),
               (good, "text/plain", 415, "content type"),
               (b"", "image/png", 400, "empty body")]
        for body, kind, code, says in bad:
            status, _, err = _post(f"{base}/predict", body, kind)
            assert status == code and says in err["error"] and "\n" not in err["error"], (kind, status, err)
            assert _post(f"{base}/predict", good, "image/png")[0] == 200
        for payload, says in (({"inputs": [[0.5] * 784]}, "of shape [1, 784]"), ({"inputs": [[[[300.0] * 28] * 28]]}, "[0, 1]"),
                              ({"rows": []}, '"inputs"')):
            status, _, err = _post(f"{base}/invocations", json.dumps(payload).encode(), "application/json")
            assert status in (400, 422) and says in err["error"], (payload, err)
        status, _, err = _post(f"{base}/invocations", b"{not json", "application/json")
        assert status == 400 and "not JSON" in err["error"]
        # A body declared larger than serve.max_body_mb: refused from its headers, before it is read.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as big:
            big.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 2097152\r\n\r\n")
            reply = _reply(big)
            assert reply.startswith(b"HTTP/1.1 413") and b"max_body_mb" in reply, reply
        assert _post(f"{base}/predict", good, "image/png")[0] == 200
        # A client that sends its headers and then only a trickle of its body: 408, others served meanwhile.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
            slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\nab")
            assert _post(f"{base}/predict", good, "image/png")[0] == 200
            assert _reply(slow).startswith(b"HTTP/1.1 408")
        assert _post(f"{base}/predict", good, "image/png")[0] == 200
    finally:
        stopped = subprocess.run([sys.executable, "-m", "imgclf.cli", "stop"], cwd=tiny_workdir, env=env,
                                 capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/livez", timeout=5)
    # v1 answered the load's requests it answered, each file three times (alone, in the multipart batch, as a
    # tensor) and the seven good requests between the bad ones
    _shadow_recorded_and_gated(tiny_workdir, pairs, answered_by_v1=seen.count("1") + 3 * len(files) + 7)


def _shadow_recorded_and_gated(workdir, pairs: set, answered_by_v1: int) -> None:
    """v2 shadowed v1 before the promotion and after the rollback: one run for the pair, ended when serve
    stopped (v2 shadowing itself while it was production is not scored); every answer pair is one of the
    files' own; shadow-report sums it; register.shadow holds promote back until the traffic suffices."""
    import csv

    import mlflow

    uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    runs = client.search_runs([client.get_experiment_by_name("imgclf-shadow").experiment_id], "tags.run_kind = 'shadow'")
    assert len(runs) == 1 and {r.info.status for r in runs} == {"FINISHED"}, [(r.info.status, r.data.tags) for r in runs]
    assert {(r.data.tags["primary.model.version"], r.data.tags["shadow.model.version"]) for r in runs} == {("1", "2")}
    images = sum(int(r.data.metrics["images"]) for r in runs)
    assert 0 < images <= answered_by_v1
    for r in runs:
        folder = client.download_artifacts(r.info.run_id, "shadow", str(workdir / r.info.run_id))
        with open(f"{folder}/answers.csv", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == int(r.data.metrics["images"])
        assert {(row["primary_class"], row["shadow_class"]) for row in rows} <= pairs
        assert sum(int(row["agree"]) for row in rows) == int(r.data.metrics["agreed"])
    res = cli("shadow-report")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["version"] == "2" and report["production"] == "1" and report["images"] == images
    assert sum(c["images"] for c in report["per_class"].values()) == images
    from PIL import Image

    assert Image.open(report["figure"]).size[0] > 200
    # The gate: more images than the traffic gave refuses, naming the setting; as many promotes.
    res = cli("promote", "--version", "2", "--set", f"register.shadow.min_requests={images + 1}")
    assert res.exit_code == 1 and "register.shadow.min_requests" in res.output and f"{images} images" in res.output
    assert str(client.get_model_version_by_alias("imgclf-mnist", "production").version) == "1"
    res = cli("promote", "--version", "2", "--set", f"register.shadow.min_requests={images}")
    assert res.exit_code == 0, res.output
    assert str(client.get_model_version_by_alias("imgclf-mnist", "production").version) == "2"


def test_waiting_requests_share_a_forward_pass_and_a_full_queue_refuses():
    """Eight requests submitted while the first pass runs are scored in one second pass, each gets its own rows;
    a request past serve.queue_size is refused at once."""
    import asyncio

    from imgclf.serve.batching import Batcher, QueueFull

    passes, release = [], threading.Event()

    def score(images):
        passes.append(len(images))
        release.wait(5)
        return images[:, :1] * 2, "model"

    async def run():
        batcher = Batcher(score, max_batch=64, max_wait_s=0.0, queue_size=10)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(np.full((1, 1), 0.5, np.float32)))
        await asyncio.sleep(0.05)  # the first pass is running: the next ones wait together
        rest = [asyncio.ensure_future(batcher.submit(np.full((1, 1), i, np.float32))) for i in range(8)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.submit(np.zeros((3, 1), np.float32))  # 8 waiting + 3 > 10
        release.set()
        got = await asyncio.gather(first, *rest)
        await batcher.stop()
        return got

    got = asyncio.run(run())
    assert passes == [1, 8]
    assert [float(p[0][0]) for p, _ in got] == [1.0, *(2.0 * i for i in range(8))] and got[0][1] == "model"


def test_the_gate_keeps_a_better_challenger_waiting_until_shadow_traffic_vouches(tmp_path):
    """register.shadow: a challenger that beats production waits as challenger while its shadow runs against
    production have too few images or too little agreement, and is promoted once they suffice. A real store."""
    from mlflow.entities import Metric

    from imgclf.registry import shadow
    from imgclf.registry.gate import gate

    client = registry_with_versions(tmp_path, 2)
    experiment = client.create_experiment(shadow.experiment_name("imgclf"))

    def traffic(images: int, agreed: int, primary: str = "1") -> None:
        run = client.create_run(experiment, tags={"run_kind": shadow.RUN_KIND, shadow.SHADOW_NAME: "m",
                                                  shadow.SHADOW_VERSION: "2", shadow.PRIMARY_NAME: "m",
                                                  shadow.PRIMARY_VERSION: primary})
        client.log_batch(run.info.run_id, metrics=[Metric("images", images, 0, 0), Metric("agreed", agreed, 0, 0)])

    def decide():
        return gate(client, "m", "2", "accuracy", 0.99, 0.9, 0.0, lambda _: 0.98,
                    shadow=lambda prod: shadow.shadow_check(client, "imgclf", "m", "2", prod, 500, 0.95))

    traffic(400, 399, primary="7")  # against another production: not evidence for this move
    traffic(300, 299)
    d = decide()
    assert not d.promoted and d.awaiting_shadow and "300 images of shadow traffic" in d.reason, d.reason
    assert "imgclf promote --version 2" in d.reason
    assert client.get_model_version("m", "2").tags["gate.decision"] == "awaiting-shadow"
    assert str(client.get_model_version_by_alias("m", "production").version) == "1"
    traffic(300, 100)  # enough images now, but 399 of 600 agree: under 95 %
    d = decide()
    assert not d.promoted and "66.50%" in d.reason, d.reason
    traffic(6000, 6000)  # 6,399 of 6,600: 96.95 %
    d = decide()
    assert d.promoted and str(client.get_model_version_by_alias("m", "production").version) == "2", d.reason
