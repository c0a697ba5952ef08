"""Test accuracy of the default CNN and MLP for several seeds, through the pipeline's own train and evaluate
stages (default params.yaml, tracking off). Prints one row per model and seed, then mean and minimum.

    uv run python bench/accuracy.py [--seeds 0 1 2] [--kinds cnn mlp] [--tiny]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_config, parser, prepared_config  # noqa: E402

from imgclf.stages.evaluate import evaluate_stage  # noqa: E402
from imgclf.stages.train import train_stage  # noqa: E402


def run(work: Path, kinds: list[str], seeds: list[int], extra: list[str] = ()) -> list[dict]:
    """Train and test each kind and seed on the data prepared under `work` (default params otherwise)."""
    rows = []
    for kind in kinds:
        for seed in seeds:
            own = work / f"{kind}-seed{seed}"
            cfg = bench_config(work, [f"model.kind={kind}", f"train.seed={seed}", f"paths.models_dir={own / 'models'}",
                                      f"paths.metrics_dir={own / 'metrics'}", f"paths.reports_dir={own / 'reports'}",
                                      *extra])
            trained = train_stage(cfg)
            tested = evaluate_stage(cfg)
            row = {"kind": kind, "seed": seed, "test_accuracy": tested["accuracy"], "epochs": trained["epochs_run"],
                   "kept_epoch": trained["kept_epoch"], "train_seconds": round(trained["train_seconds"], 1)}
            print(f"{kind} seed {seed}: test accuracy {row['test_accuracy']:.2%} after {row['epochs']} epochs "
                  f"(kept epoch {row['kept_epoch']}), {row['train_seconds']} s of training", flush=True)
            rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        accs = [r["test_accuracy"] for r in rows if r["kind"] == kind]
        secs = [r["train_seconds"] for r in rows if r["kind"] == kind]
        out[kind] = {"mean": sum(accs) / len(accs), "min": min(accs), "max": max(accs),
                     "mean_train_seconds": sum(secs) / len(secs)}
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", default=["cnn", "mlp"])
    args = p.parse_args()
    extra = ["train.max_epochs=1"] if args.tiny else []
    cfg = prepared_config(args)
    rows = run(Path(cfg.paths.processed_dir).parent, args.kinds, args.seeds, extra)
    for kind, s in summary(rows).items():
        print(f"{kind}: mean {s['mean']:.2%}, min {s['min']:.2%}, max {s['max']:.2%}, "
              f"{s['mean_train_seconds']:.0f} s of training on average")


if __name__ == "__main__":
    main()
