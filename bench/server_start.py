"""Time to ready of the two servers, as a person starts them: from the command until the health URL answers.
MLflow: `mlflow server` (what `imgclf ui` ran before: MLflow's CLI, which imports all of MLflow only to start a
uvicorn child that imports it again) against `imgclf ui` now (the same app in one process). Prefect: `prefect
server start` against `imgclf prefect-server` (which starts that same command with analytics off). Each pair runs
alternately, `--rounds` times, over a fresh store in a temp folder; run it with nothing else on the machine.

    uv run python bench/server_start.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready_in(cmd: list[str], url: str, env: dict, cwd: Path, timeout: float = 600) -> float:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return time.monotonic() - t0
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(url)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        for k in [k for k in env if k.startswith(("MLFLOW_TRACKING", "PREFECT_API"))]:
            env.pop(k)
        store = work / "mlflow"
        store.mkdir()
        pairs = {
            "MLflow": lambda port: [
                ("mlflow server", [PY, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
                                   "--artifacts-destination", (store / "artifacts").as_uri(), "--port", str(port),
                                   "--workers", "1"], f"http://127.0.0.1:{port}/health"),
                ("imgclf ui", [PY, "-m", "imgclf.cli", "ui", "--port", str(port), "--set",
                               f"paths.mlflow_dir={store}"], f"http://127.0.0.1:{port}/health")],
            "Prefect": lambda port: [
                ("prefect server start", [PY, "-m", "prefect", "server", "start", "--port", str(port)],
                 f"http://127.0.0.1:{port}/api/health"),
                ("imgclf prefect-server", [PY, "-m", "imgclf.cli", "prefect-server", "--port", str(port)],
                 f"http://127.0.0.1:{port}/api/health")],
        }
        (work / "params.yaml").write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
        print(f"| server | before | after | after/before | ({args.rounds} rounds, median seconds to ready) |")
        print("|---|---|---|---|---|")
        for name, make in pairs.items():
            times: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                for label, cmd, url in make(free_port()):
                    times.setdefault(label, []).append(ready_in(cmd, url, env, work))
            (b, tb), (a, ta) = times.items()
            mb, ma = statistics.median(tb), statistics.median(ta)
            print(f"| {name} | `{b}` {mb:.1f} s | `{a}` {ma:.1f} s | {ma / mb:.2f} | "
                  f"{', '.join(f'{x:.1f}' for x in tb)} / {', '.join(f'{x:.1f}' for x in ta)} |", flush=True)


if __name__ == "__main__":
    main()
