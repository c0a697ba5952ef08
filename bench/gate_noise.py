"""How often the gate promotes noise: one recipe trained with several seeds on real MNIST, the first seed as
production and each other one as a challenger, scored on the same 10,000 test images with the gate's own
scorer and compared image by image (imgclf.registry.paired). A challenger of the same recipe is no better
by construction, so every promotion counted here is one the registry should not have made.

For each challenger: its accuracy gain over production, the images it fixes and breaks, McNemar's p-value,
and whether the gate promotes it with `register.min_improvement: 0` alone and with `register.significance`
at each level. The recipe is bench/time_to_accuracy.py's (99 % in two epochs): the point is the spread
between seeds, which the default CNN has too.

    uv run python bench/gate_noise.py [--seeds 0 1 2 3 4 5] [--mirror DIR] [--tiny]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, parser, prepared_config  # noqa: E402
from time_to_accuracy import FAST_RECIPE, VAL_IMAGES  # noqa: E402

from imgclf import config  # noqa: E402
from imgclf.data.batches import Batches, Split, load_split, read_meta  # noqa: E402
from imgclf.evaluation.scoring import evaluate  # noqa: E402
from imgclf.models.classifier import build_model  # noqa: E402
from imgclf.registry.paired import compare  # noqa: E402
from imgclf.training.loop import fit  # noqa: E402
from imgclf.training.runtime import set_threads  # noqa: E402

LEVELS = (0.05, 0.01)


def train_and_score(cfg: config.Config, seed: int):
    cfg = config.from_dict(cfg.to_dict(), {"train.seed": seed})
    d = Path(cfg.paths.processed_dir)
    meta = read_meta(d / "meta.json")
    cpu = torch.device("cpu")
    full_val = load_split(d / "val.pt")
    val = Batches(Split(full_val.images[:VAL_IMAGES], full_val.labels[:VAL_IMAGES]), cpu)
    torch.manual_seed(seed)
    model = build_model(cfg.model, tuple(meta["image_shape"]), len(meta["classes"]), meta["normalization"]["mean"],
                        meta["normalization"]["std"])
    fit(model, Batches(load_split(d / "train.pt"), cpu), val, cfg.train)
    test = load_split(d / "test.pt")
    return evaluate(model, test, meta["classes"], cfg.runtime.eval_batch_size), test, meta["classes"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    args = p.parse_args()
    t0 = time.perf_counter()
    cfg = prepared_config(args, overrides=FAST_RECIPE)
    set_threads(cfg.runtime.threads)
    scored = {}
    for seed in args.seeds:
        scored[seed] = train_and_score(cfg, seed)
        print(f"seed {seed}: test accuracy {scored[seed][0].accuracy:.2%}", flush=True)
    production, test, classes = scored[args.seeds[0]]
    labels, ids = test.labels.numpy(), test.sample_ids()
    rows, promoted = [], {"min_improvement 0": 0, **{f"significance {a}": 0 for a in LEVELS}}
    for seed in args.seeds[1:]:
        challenger = scored[seed][0]
        paired = compare(labels, challenger.predictions, production.predictions, classes, ids)
        gain = challenger.accuracy - production.accuracy
        verdicts = {"min_improvement 0": gain > 0, **{f"significance {a}": gain > 0 and paired.p_value <= a
                                                       for a in LEVELS}}
        for k, v in verdicts.items():
            promoted[k] += v
        rows.append(f"| {seed} | {challenger.accuracy:.2%} | {gain:+.2%} | {paired.fixed} | {paired.broken} | "
                    f"{paired.p_value:.3g} | " + " | ".join("promoted" if v else "kept out" for v in verdicts.values())
                    + " |")
    m = machine()
    n = len(args.seeds) - 1
    print(f"\n{m['cpu']}, {m['cores']} cores; production: seed {args.seeds[0]} at {production.accuracy:.2%}; "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| challenger seed | accuracy | gain | fixed | broken | McNemar p | " + " | ".join(promoted) + " |")
    print("|" + " --- |" * (6 + len(promoted)))
    print("\n".join(rows))
    print(f"\npromoted (of {n} same-recipe challengers): "
          + ", ".join(f"{k}: {v} ({v / n:.0%})" for k, v in promoted.items()))


if __name__ == "__main__":
    main()
