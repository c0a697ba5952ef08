"""Two trainings on one machine: at the same time (as compare-models runs them) against one after the other.
Each is the real `imgclf train` process with threads left at 0: each keeps the thread count of this
process's cores for the whole run (deterministic weights), and the OS shares the cores between them.
Prints both wall times and their ratio.

    uv run python bench/concurrency.py [--set train.max_epochs=1] [--tiny]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, parser, prepared_config  # noqa: E402


def _train(work: Path, name: str, overrides: list[str]) -> subprocess.Popen:
    sets = [f"paths.models_dir={work / name / 'models'}", f"paths.metrics_dir={work / name / 'metrics'}",
            f"paths.processed_dir={work / 'processed'}", f"paths.raw_dir={work / 'raw'}", "runtime.tracking.enabled=false",
            "paths.dvc_file=null", "runtime.threads=0", *overrides]
    args = [sys.executable, "-m", "imgclf.cli", "train", "--params", str(REPO / "params.yaml")]
    for s in sets:
        args += ["--set", s]
    return subprocess.Popen(args, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))


def _wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"training failed: {err[-2000:]}")


def run(work: Path, overrides: list[str]) -> dict:
    start = time.perf_counter()
    for name in ("seq-a", "seq-b"):
        _wait([_train(work, name, overrides)])
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    _wait([_train(work, name, overrides) for name in ("par-a", "par-b")])
    concurrent = time.perf_counter() - start
    print(f"two trainings ({' '.join(overrides)}): one after the other {sequential:.1f} s, at the same time "
          f"{concurrent:.1f} s (ratio {concurrent / sequential:.2f})", flush=True)
    return {"sequential_seconds": sequential, "concurrent_seconds": concurrent, "ratio": concurrent / sequential,
            "overrides": overrides}


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    cfg = prepared_config(args)
    run(Path(cfg.paths.processed_dir).parent, args.overrides or ["train.max_epochs=1"])


if __name__ == "__main__":
    main()
