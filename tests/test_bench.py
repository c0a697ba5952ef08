"""The benchmarks run on a fresh clone and never touch the repo's DVC files or MLflow store."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .helpers import REPO

pytestmark = pytest.mark.integration  # real servers, processes or stores: see conftest's layers


@pytest.mark.slow
def test_run_all_on_tiny_data_writes_every_figure(tmp_path):
    watched = [REPO / "data.dvc", REPO / "dvc.lock"]
    before = {p: p.read_bytes() for p in watched if p.is_file()}
    out = tmp_path / "RESULTS.md"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--tiny", "--out", str(out),
                          "--workdir", str(tmp_path / "work")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    for section in ("| cores |", "| cnn | 0 |", "| mlp | 0 |", "Time to 99 % test accuracy", "num_workers=0",
                    "one after the other", "Tiny generated data"):
        assert section in text, section
    assert {p: p.read_bytes() for p in watched if p.is_file()} == before
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / "work" / "mlflow").exists()


def test_snapshot_footprint_on_tiny_data(tmp_path):
    """Links keep the data stored fewer times than copies (300 PNGs; the full run is in docs/benchmarks.md)."""
    res = subprocess.run([sys.executable, str(REPO / "bench" / "snapshot_footprint.py"), "--tiny"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    times = {line.split(":")[0].strip(): float(line.split("= ")[1].split("x")[0])
             for line in res.stdout.splitlines() if " MB = " in line}
    assert set(times) == {"copies", "links", "hardlink"}, res.stdout
    assert times["copies"] > 3.5 and times["links"] < times["copies"] - 0.9 and times["hardlink"] < times["links"]


@pytest.mark.slow
def test_serve_bench_measures_every_server_on_tiny_data(tmp_path):
    """bench/serve.py end to end, short: every server starts and answers every request, and the table has its
    ratios to mlflow's (the full run, 1, 8 and 32 clients, is in docs/benchmarks.md)."""
    res = subprocess.run([sys.executable, str(REPO / "bench" / "serve.py"), "--tiny", "--seconds", "0.5",
                          "--concurrency", "4", "--rounds", "1", "--workdir", str(tmp_path / "work")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    measured = [line for line in res.stdout.splitlines() if line.startswith("  ") and " req/s " in line]
    assert len(measured) == 4 and all(line.endswith("errors 0") for line in measured), res.stdout
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| ") and "x |" in line]
    assert {(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows} == {
        (server, path, c) for server, path in (("imgclf serve", "/invocations"), ("imgclf serve", "/predict"),
                                               ("imgclf serve, no batching", "/invocations"),
                                               ("mlflow models serve", "/invocations")) for c in ("4",)}, res.stdout
    assert all(float(r[3]) > 0 and r[6].strip() == "1.00x" for r in rows if r[0].strip() == "mlflow models serve")


@pytest.mark.slow
def test_gpu_script_dry_run_prints_its_table_on_the_cpu(tmp_path):
    """bench/gpu.sh --dry-run: the GPU runs' code (race, pipeline, DDP) on the CPU with tiny data, one table."""
    res = subprocess.run([str(REPO / "bench" / "gpu.sh"), "--dry-run", "--workdir", str(tmp_path / "work")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].split(",")[0].split(" (")[0].strip() for r in rows] == [
        "race to 99 %", "default CNN pipeline", "DDP"], res.stdout
    assert "100.00%" in rows[0] and "2 processes, gloo" in rows[2], rows  # the race learned; both ranks ran
    assert all(re.search(r"\| (val )?\d+\.\d\d% \|", r) for r in rows), rows
