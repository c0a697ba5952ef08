"""The seed's data path (torchvision MNIST + ToTensor + Normalize + DataLoader(64, shuffle)) against
imgclf's (one uint8 tensor, randperm, slices), on the same CNN: images/s for loading alone and for one
training pass. The seed's DataLoader runs with num_workers=0 and with the lesson's advice, one worker per
CPU core. Prints every figure and the ratios.

    uv run python bench/data_path.py [--mirror DIR] [--epoch-images N] [--tiny]
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, prepared_config  # noqa: E402

from imgclf import config  # noqa: E402
from imgclf.data.batches import Batches, load_split, to_float  # noqa: E402
from imgclf.models.classifier import build_model  # noqa: E402
from imgclf.training.epoch import make_optimizer  # noqa: E402
from imgclf.training.runtime import available_cores, set_threads  # noqa: E402


def seed_loader(raw_mnist: Path, workers: int):
    from torchvision import datasets, transforms

    root = Path(tempfile.mkdtemp(prefix="seed-mnist-"))
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with gzip.open(raw_mnist / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    ds = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0)


def time_loading(batches, limit: int) -> float:
    n, t0 = 0, time.perf_counter()
    for _x, y in batches:
        n += len(y)
        if n >= limit:
            break
    return n / (time.perf_counter() - t0)


def time_epoch(model, batches, prep, limit: int, cfg) -> float:
    opt = make_optimizer(model, cfg.train)
    model.train()
    n, t0 = 0, time.perf_counter()
    for x, y in batches:
        loss = F.cross_entropy(model(prep(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(y)
        if n >= limit:
            break
    return n / (time.perf_counter() - t0)


def run(cfg: config.Config, epoch_images: int = 60000) -> dict:
    threads = set_threads(cfg.runtime.threads)
    cores = available_cores()
    train = load_split(Path(cfg.paths.processed_dir) / "train.pt")
    ours = Batches(train, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    mean = torch.tensor(0.5)

    def our_prep(x):  # what the model's own normalization layer does, done here for the loading-only figure
        return ((to_float(x) - mean) / mean).contiguous(memory_format=torch.channels_last)

    def model():
        torch.manual_seed(0)
        return build_model(cfg.model, (1, 28, 28), 10)

    out = {"threads": threads, "cores": cores, "model": f"{cfg.model.kind} {cfg.model.cnn.channels}"}
    raw = Path(cfg.paths.raw_dir) / "mnist"
    limit = min(epoch_images, len(train))
    our_load = time_loading(((our_prep(x), y) for x, y in ours.epoch(64, gen)), len(train))
    ours_64 = time_epoch(model().to(memory_format=torch.channels_last), ours.epoch(64, gen),
                         lambda x: to_float(x).contiguous(memory_format=torch.channels_last), limit, cfg)
    bs = cfg.train.batch_size
    ours_bs = time_epoch(model().to(memory_format=torch.channels_last), ours.epoch(bs, gen),
                         lambda x: to_float(x).contiguous(memory_format=torch.channels_last), limit, cfg)
    out.update(ours_load=our_load, ours_epoch_64=ours_64, ours_epoch_bs=ours_bs, batch_size=bs)
    for workers in sorted({0, cores}):
        seed = seed_loader(raw, workers)
        seed_load = time_loading(seed, len(seed.dataset))
        seed_epoch = time_epoch(model(), seed, lambda x: x, limit, cfg)
        out[f"seed_load_w{workers}"], out[f"seed_epoch_w{workers}"] = seed_load, seed_epoch
        print(f"seed, num_workers={workers}: loading {seed_load:9.0f} img/s (ours {our_load:9.0f}, "
              f"{our_load / seed_load:5.1f}x); training pass {seed_epoch:6.0f} img/s (ours at batch 64 {ours_64:6.0f}, "
              f"{ours_64 / seed_epoch:4.1f}x; ours at batch {bs} {ours_bs:6.0f}, {ours_bs / seed_epoch:4.1f}x)",
              flush=True)
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--epoch-images", type=int, default=60000, help="cap on images per timed training pass")
    args = p.parse_args()
    run(prepared_config(args), args.epoch_images)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(available_cores()))
    main()
