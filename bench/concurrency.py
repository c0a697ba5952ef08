"""Two trainings on one machine: at the same time (as compare-models runs them) against one after the other.
Each is the real `imgclf train` process with threads left at 0: each keeps the thread count of this
process's cores for the whole run (deterministic weights), and the OS shares the cores between them.
Prints both wall times and their ratio.

--wait-policy: how OpenMP's idle threads wait when two trainings share the cores. torch's OpenMP (libgomp)
spins a while before it sleeps (300,000 times unless told otherwise); a process can't see that another one has
the cores, so two trainings with a thread per core each burn CPU spinning. Runs one alone (the better of two)
and a pair at the same time under each setting of WAIT_POLICIES, and prints wall time, CPU-seconds and the
ratios to libgomp's default (what imgclf's default rests on).

    uv run python bench/concurrency.py [--set train.max_epochs=1] [--tiny] [--wait-policy]
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, parser, prepared_config  # noqa: E402


def _train(work: Path, name: str, overrides: list[str], env: dict | None = None) -> subprocess.Popen:
    sets = [f"paths.models_dir={work / name / 'models'}", f"paths.metrics_dir={work / name / 'metrics'}",
            f"paths.processed_dir={work / 'processed'}", f"paths.raw_dir={work / 'raw'}", "runtime.tracking.enabled=false",
            "paths.dvc_file=null", "runtime.threads=0", *overrides]
    args = [sys.executable, "-m", "imgclf.cli", "train", "--params", str(REPO / "params.yaml")]
    for s in sets:
        args += ["--set", s]
    return subprocess.Popen(args, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env if env is not None else dict(os.environ))


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


def _timed(work: Path, names: list[str], overrides: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and the CPU-seconds (user + system) the trainings used, started together."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    _wait([_train(work, name, overrides, env) for name in names])
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# How idle OpenMP threads wait: libgomp's default spin (300,000, what it uses when nothing is set; imgclf sets its
# own when nothing is set, see imgclf/__init__.py), imgclf's, and no spin at all.
WAIT_POLICIES = {"libgomp's 300000": {"GOMP_SPINCOUNT": "300000"}, "imgclf's 10000": {"GOMP_SPINCOUNT": "10000"},
                 "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}


def wait_policies(work: Path, overrides: list[str]) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    results: dict[str, dict] = {name: {} for name in WAIT_POLICIES}
    for name, env in WAIT_POLICIES.items():  # every setting alone first, twice: the first run warms the caches
        first = _timed(work, [f"{name}-solo"], overrides, {**base, **env})
        again = _timed(work, [f"{name}-solo"], overrides, {**base, **env})
        results[name]["alone_s"], results[name]["alone_cpu_s"] = min(first[0], again[0]), min(first[1], again[1])
    for name, env in WAIT_POLICIES.items():
        results[name]["pair_s"], results[name]["pair_cpu_s"] = _timed(work, [f"{name}-a", f"{name}-b"], overrides,
                                                                       {**base, **env})
    ref = next(iter(results.values()))
    for name, r in results.items():
        print(f"{name:>22}: one training {r['alone_s']:6.1f} s ({r['alone_cpu_s']:4.0f} CPU-s), two at once "
              f"{r['pair_s']:6.1f} s ({r['pair_cpu_s']:4.0f} CPU-s); against libgomp's: alone "
              f"{r['alone_s'] / ref['alone_s']:.2f}, two at once {r['pair_s'] / ref['pair_s']:.2f}", flush=True)
    return results


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--wait-policy", action="store_true", help="compare how OpenMP's idle threads wait (WAIT_POLICIES)")
    args = p.parse_args()
    cfg = prepared_config(args)
    work, overrides = Path(cfg.paths.processed_dir).parent, args.overrides or ["train.max_epochs=1"]
    if args.wait_policy:
        wait_policies(work, overrides)
    else:
        run(work, overrides)


if __name__ == "__main__":
    main()
