"""Every benchmark in one run, on one machine, written to bench/RESULTS.md (docs/benchmarks.md quotes that file):
CNN and MLP test accuracy per seed (default params), the honest time-to-accuracy protocol, the seed-vs-ours
data-path ratios, and two trainings at once against one after the other.

    uv run python bench/run_all.py [--mirror DIR] [--out bench/RESULTS.md] [--tiny]

Nothing else should run on the machine meanwhile (timings). --tiny runs it all on generated data in a
minute or two (the test suite does, so the benchmarks cannot rot); its figures mean nothing.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import concurrency  # noqa: E402
import data_path  # noqa: E402
import time_to_accuracy as tta  # noqa: E402
from _common import REPO, machine, parser, prepared_config  # noqa: E402


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = p.parse_args()
    start = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgclf-bench-all-"))
    m = machine()
    tiny = args.tiny
    seeds = [0] if tiny else [0, 1, 2]
    tta_seeds = [0, 1] if tiny else [0, 1, 2, 3, 4]

    base = prepared_config(args, work / "data")
    dp = data_path.run(base, 2000 if tiny else 60000)
    fast = prepared_config(args, work / "tta", overrides=tta.FAST_RECIPE)
    race = tta.run(fast, tta_seeds)
    rows = accuracy.run(work / "data", ["cnn", "mlp"], seeds, ["train.max_epochs=1"] if tiny else [])
    acc = accuracy.summary(rows)
    pair = concurrency.run(work / "data", ["train.max_epochs=1"])

    lines = [
        "# Benchmark results", "",
        f"Written by `uv run python bench/run_all.py{' --tiny' if tiny else ''}` at commit {_commit()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, in {time.perf_counter() - start:.0f} s.",
        "" if not tiny else "**Tiny generated data: these figures only show that the benchmarks run.**", "",
        "| machine | |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in m.items()],
        f"| torch threads per training | {dp['threads']} (runtime.threads: 0 = the cores this process may use) |", "",
        "## Test accuracy, default params (`scripts/pipeline` settings), per seed", "",
        "| model | seed | test accuracy | epochs run | weights kept from epoch | training s |", "|---|---|---|---|---|---|",
        *[f"| {r['kind']} | {r['seed']} | {r['test_accuracy']:.2%} | {r['epochs']} | {r['kept_epoch']} | "
          f"{r['train_seconds']:.0f} |" for r in rows], "",
        *[f"- {k.upper()}: mean **{s['mean']:.2%}**, min {s['min']:.2%}, max {s['max']:.2%}; "
          f"{s['mean_train_seconds']:.0f} s of training on average" for k, s in acc.items()], "",
        "## Time to 99 % test accuracy (honest protocol)", "",
        f"Schedule fixed in advance ({', '.join(f'`{o}`' for o in tta.FAST_RECIPE)}), always trained to its end, "
        f"test accuracy measured once at the end, {len(tta_seeds)} seeds, on {race['device']}.", "",
        "| seed | test accuracy | training s |", "|---|---|---|",
        *[f"| {s} | {a:.2%} | {t:.2f} |" for s, a, t in zip(race["seeds"], race["accuracies"], race["seconds"])], "",
        f"Mean **{race['mean_accuracy']:.2%}** (std {race['std_accuracy']:.2%}, min {race['min_accuracy']:.2%}, "
        f"max {race['max_accuracy']:.2%}) in **{race['mean_seconds']:.2f} s** of training on average.", "",
        "## Data path: the seed's DataLoader against one uint8 tensor", "",
        f"Images per second, {dp['model']}, {dp['threads']} threads.", "",
        "| | loading only | training pass, batch 64 |", "|---|---|---|",
        *[f"| seed, num_workers={w} | {dp[f'seed_load_w{w}']:.0f} | {dp[f'seed_epoch_w{w}']:.0f} |"
          for w in sorted({0, dp['cores']})],
        f"| ours | {dp['ours_load']:.0f} | {dp['ours_epoch_64']:.0f} (batch {dp['batch_size']}: "
        f"{dp['ours_epoch_bs']:.0f}) |", "",
        *[f"- against num_workers={w}: loading **{dp['ours_load'] / dp[f'seed_load_w{w}']:.1f}x**, training pass "
          f"**{dp['ours_epoch_64'] / dp[f'seed_epoch_w{w}']:.2f}x** at batch 64, "
          f"**{dp['ours_epoch_bs'] / dp[f'seed_epoch_w{w}']:.2f}x** at batch {dp['batch_size']}"
          for w in sorted({0, dp['cores']})], "",
        "## Two trainings on one machine", "",
        f"Default CNN, `{' '.join(pair['overrides'])}`, threads left at 0 (each keeps its own fixed count): "
        f"one after the other **{pair['sequential_seconds']:.1f} s**, at the same time "
        f"**{pair['concurrent_seconds']:.1f} s** (ratio {pair['ratio']:.2f}).", "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
