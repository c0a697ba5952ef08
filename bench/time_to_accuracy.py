"""Wall time of training until the CNN first reaches a test accuracy (default 99.0 %).

Test accuracy is checked --checks-per-epoch times an epoch with the clock stopped.
Prints device, threads, epochs and time; --set overrides any param, the FAST_RECIPE below included.

    uv run python bench/time_to_accuracy.py [--target 0.99] [--set train.device=cuda]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, prepared_config  # noqa: E402

from imgclf.data import Batches, Split, load_split  # noqa: E402
from imgclf.models import build_model  # noqa: E402
from imgclf.runtime import resolve_device, set_threads  # noqa: E402
from imgclf.train import evaluate_batches, fit  # noqa: E402

# A one-epoch recipe for this race (the pipeline's defaults aim at 99.5 % in 12 epochs instead):
# one conv per block, small batches, OneCycle over a single epoch, no augmentation. Any --set wins.
FAST_RECIPE = ["model.kind=cnn", "model.cnn.channels=[16,32,64]", "model.cnn.convs_per_block=1",
               "train.batch_size=64", "train.lr=0.006", "train.max_epochs=1", "train.augment_shift=0"]


class Reached(Exception):
    pass


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--checks-per-epoch", type=int, default=8)
    p.add_argument("--val-images", type=int, default=2000, help="validation subset run inside the clock")
    args = p.parse_args()
    given = {o.split("=", 1)[0] for o in args.overrides}
    args.overrides[:0] = [o for o in FAST_RECIPE if o.split("=", 1)[0] not in given]
    cfg = prepared_config(args)
    threads = set_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    d = cfg.data.processed_dir
    train, test = Batches(load_split(Path(d) / "train.pt"), device), Batches(load_split(Path(d) / "test.pt"), device)
    full_val = load_split(Path(d) / "val.pt")
    val = Batches(Split(full_val.images[: args.val_images], full_val.labels[: args.val_images]), device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tuple(train.split.images.shape[1:]), 10, [0.5], [0.5]).to(device)
    paused = 0.0
    state = {"acc": 0.0, "epoch": 0, "batch": 0}
    t_start = time.perf_counter()

    def on_batch(label, done, total):  # label: "epoch N"
        nonlocal paused
        epoch = int(label.split()[-1])
        if done % max(1, total // args.checks_per_epoch) and done != total:
            return
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, acc = evaluate_batches(model, test, 2000)
        model.train()
        state.update(acc=acc, epoch=epoch, batch=done)
        paused += time.perf_counter() - t0
        if acc >= args.target:
            raise Reached

    reached = False
    try:
        fit(model, train, val, cfg.train, on_batch=on_batch)
    except Reached:
        reached = True
    seconds = time.perf_counter() - t_start - paused
    frac = state["epoch"] - 1 + state["batch"] / max(1, -(-len(train) // cfg.train.batch_size))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}  threads {threads}  model {cfg.model.kind} {cfg.model.cnn.channels}x{cfg.model.cnn.convs_per_block}"
          f"  batch {cfg.train.batch_size}")
    verdict = "reached" if reached else "NOT reached"
    print(f"{verdict} {args.target:.2%} test accuracy: {state['acc']:.2%} after {frac:.2f} epochs, "
          f"{seconds:.1f} s of training")


if __name__ == "__main__":
    main()
