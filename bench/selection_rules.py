"""Which weights to keep at the end of training? Train the default model on real MNIST for each seed, record
every epoch's validation loss/accuracy and (for this study only) test accuracy, and print the test accuracy
each best-weights rule would have kept. The rule is chosen on validation numbers alone; test accuracy is
read here only to compare rules, never to pick an epoch.

    uv run python bench/selection_rules.py [--seeds 0 1 2] [--set model.kind=mlp]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, prepared_config  # noqa: E402

from imgclf import config  # noqa: E402
from imgclf.data.batches import Batches, load_split, read_meta  # noqa: E402
from imgclf.models.classifier import build_model  # noqa: E402
from imgclf.training.loop import Hooks, evaluate_batches, fit  # noqa: E402
from imgclf.training.runtime import resolve_device, set_threads  # noqa: E402

RULES = {
    "min val loss": lambda h: min(h, key=lambda r: (r["val_loss"], -r["epoch"])),
    "max val acc (loss breaks ties)": lambda h: min(h, key=lambda r: (-r["val_acc"], r["val_loss"])),
    "last epoch": lambda h: h[-1],
}


def train_one(cfg: config.Config, seed: int) -> tuple[list[dict], float]:
    cfg = config.from_dict(cfg.to_dict(), {"train.seed": seed})
    device = resolve_device(cfg.runtime.device)
    d = Path(cfg.paths.processed_dir)
    meta = read_meta(d / "meta.json")
    train, val = Batches(load_split(d / "train.pt"), device), Batches(load_split(d / "val.pt"), device)
    test = Batches(load_split(d / "test.pt"), device)
    torch.manual_seed(seed)
    model = build_model(cfg.model, tuple(meta["image_shape"]), 10, meta["normalization"]["mean"],
                        meta["normalization"]["std"]).to(device)
    history: list[dict] = []

    def record(row):
        _, acc = evaluate_batches(model, test, 2000)
        history.append({**row, "test_acc": acc})

    result = fit(model, train, val, cfg.train, hooks=Hooks(on_epoch_end=record))
    return history, result.seconds


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", default=None, help="also write the per-epoch rows here")
    args = p.parse_args()
    cfg = prepared_config(args)
    threads = set_threads(cfg.runtime.threads)
    rows = {}
    for seed in args.seeds:
        history, seconds = train_one(cfg, seed)
        rows[seed] = history
        picks = {name: rule(history) for name, rule in RULES.items()}
        print(f"seed {seed} ({cfg.model.kind}, {threads} threads, {seconds:.0f} s, {len(history)} epochs): " + "; ".join(
            f"{name}: epoch {r['epoch']} test {r['test_acc']:.2%}" for name, r in picks.items()), flush=True)
    print("mean test accuracy per rule:")
    for name, rule in RULES.items():
        accs = [rule(h)["test_acc"] for h in rows.values()]
        print(f"  {name:32s} {sum(accs) / len(accs):.4%}   min {min(accs):.4%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
