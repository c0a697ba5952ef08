"""Online serving under load: `imgclf serve` with its dynamic batching, the same with batching off
(serve.max_batch_size=1), and `mlflow models serve` (--env-manager local), each over the same registered model,
one after the other on this machine. Clients in threads of this process send one-image requests back to back on
keep-alive connections (JSON tensors to /invocations, the one input both services take; imgclf also with a PNG
to /predict) at each concurrency; prints requests/s, p50 and p99 latency, and the ratios to mlflow's. Every
server is measured `--rounds` times in turn and each cell keeps its best round.

The model: `--model-uri` (with MLFLOW_TRACKING_URI, or the checkout's embedded store), else the default CNN
trained here for one epoch on MNIST (`--tiny`: the tests' tiny data, seconds) and registered in a store of its own.

    uv run python bench/serve.py [--model-uri models:/imgclf-mnist@production] [--tiny] [--seconds 5]
                                 [--concurrency 1 8 32]
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine, parser, prepared_config  # noqa: E402


def registered_model(args, work: Path) -> tuple[str, dict[str, str]]:
    """A model URI and the environment that finds it."""
    if args.model_uri:
        return args.model_uri, dict(os.environ)
    from imgclf.stages.evaluate import evaluate_stage
    from imgclf.stages.register import register_stage
    from imgclf.stages.train import train_stage

    store = work / "mlflow"
    cfg = prepared_config(args, work, ["train.max_epochs=1", "runtime.tracking.enabled=true", f"paths.mlflow_dir={store}",
                                       "register.min_score=0.0", "register.model_name=serve-bench"])
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    train_stage(cfg)
    evaluate_stage(cfg)
    register_stage(cfg)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    return "models:/serve-bench@production", {**os.environ, "MLFLOW_TRACKING_URI": uri}


def _wait(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    from imgclf.ops.background import answers  # any answer below 500: /readyz is 503 until the model is loaded

    t0 = time.monotonic()
    while not answers(url):
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode})")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(url)
        time.sleep(0.3)


def _start(kind: str, model_uri: str, env: dict, port: int, work: Path) -> subprocess.Popen:
    log = open(work / f"{kind}.log", "wb")
    if kind == "mlflow models serve":
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
        ready = f"http://127.0.0.1:{port}/ping"
    else:
        batch = [] if kind == "imgclf serve" else ["--set", "serve.max_batch_size=1"]
        cmd = [sys.executable, "-m", "imgclf.cli", "serve", "--model-uri", model_uri, "--port", str(port),
               "--params", str(REPO / "params.yaml"), *batch]
        ready = f"http://127.0.0.1:{port}/readyz"
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _wait(ready, proc)
    return proc


def _load(port: int, path: str, body: bytes, content_type: str, concurrency: int, seconds: float) -> dict:
    """Clients back to back for `seconds` (after one second of warm-up); requests/s and latency percentiles."""
    latencies: list[float] = []
    errors, lock, stop, measure = [0], threading.Lock(), threading.Event(), threading.Event()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body, {"Content-Type": content_type})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            if measure.is_set():
                if ok:
                    mine.append(time.perf_counter() - t0)
                else:
                    with lock:
                        errors[0] += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    measure.set()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - t0
    for t in threads:
        t.join()
    lat = np.asarray(latencies) * 1000
    return {"rps": len(lat) / elapsed, "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"), "errors": errors[0]}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model-uri", default=None)
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per server and concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=2, help="every server measured this many times, in turn; the "
                                                          "best round of each cell is kept (this machine is noisy)")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgclf-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_uri, env = registered_model(args, work)
    # `mlflow models serve` runs `uvicorn` by name: the environment's own scripts first on PATH.
    env = {**env, "PYTHONPATH": str(REPO / "src"), "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}

    from PIL import Image

    from imgclf.data.synthetic import separable_digits

    image = separable_digits(1, seed=3)[0][0]
    tensor = json.dumps({"inputs": [[(image.astype(np.float32) / 255).tolist()]]}).encode()
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    cases = [("imgclf serve", "/invocations", tensor, "application/json"),
             ("imgclf serve", "/predict", png.getvalue(), "image/png"),
             ("imgclf serve, no batching", "/invocations", tensor, "application/json"),
             ("mlflow models serve", "/invocations", tensor, "application/json")]
    print(f"machine: {machine()}; model {model_uri}; {args.seconds:g} s per cell, one-image requests", flush=True)
    results: dict[tuple[str, str, int], dict] = {}
    from imgclf.ops.stack import free_port

    for kind in [k for _ in range(args.rounds) for k in dict.fromkeys(c[0] for c in cases)]:
        port = free_port()
        proc = _start(kind, model_uri, env, port, work)
        try:
            for name, path, body, content_type in cases:
                if name != kind:
                    continue
                for c in args.concurrency:
                    r = _load(port, path, body, content_type, c, args.seconds)
                    best = results.get((kind, path, c))
                    results[(kind, path, c)] = {"rps": max(r["rps"], best["rps"]), "p50": min(r["p50"], best["p50"]),
                                                "p99": min(r["p99"], best["p99"]),
                                                "errors": r["errors"] + best["errors"]} if best else r
                    print(f"  {kind:26s} {path:12s} c={c:<3d} {r['rps']:8.0f} req/s  p50 {r['p50']:7.2f} ms  "
                          f"p99 {r['p99']:7.2f} ms  errors {r['errors']}", flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)

    print("\n| server | endpoint | concurrency | req/s | p50 ms | p99 ms | req/s vs mlflow | p99 vs mlflow |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, path, c), r in results.items():
        base = results.get(("mlflow models serve", "/invocations", c))
        ratio = f"{r['rps'] / base['rps']:.2f}x" if base and base["rps"] else "-"
        p99 = f"{r['p99'] / base['p99']:.2f}x" if base and base["p99"] else "-"
        print(f"| {kind} | {path} | {c} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {ratio} | {p99} |")


if __name__ == "__main__":
    main()
