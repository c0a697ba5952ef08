"""The seed's data path (torchvision MNIST + ToTensor + Normalize + DataLoader(64, shuffle)) against
imgclf's (one uint8 tensor, randperm, slices), on the same CNN: images/s for loading alone and for
one full training epoch. Prints both and the ratios.

    uv run python bench/data_path.py [--mirror DIR] [--epoch-images N]
"""

from __future__ import annotations

import gzip
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, prepared_config  # noqa: E402

from imgclf.data import Batches, load_split, to_float  # noqa: E402
from imgclf.models import build_model  # noqa: E402
from imgclf.runtime import set_threads  # noqa: E402
from imgclf.train import make_optimizer  # noqa: E402


def seed_loader(mirror: str):
    from torchvision import datasets, transforms

    root = Path(tempfile.mkdtemp(prefix="seed-mnist-"))
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with gzip.open(Path(mirror) / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    ds = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)


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


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--epoch-images", type=int, default=60000, help="cap on images per timed training pass")
    args = p.parse_args()
    cfg = prepared_config(args)
    threads = set_threads(cfg.train.threads)
    seed = seed_loader(args.mirror)
    train = load_split(Path(cfg.data.processed_dir) / "train.pt")
    ours = Batches(train, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    mean = torch.tensor(0.5)

    def our_prep(x):  # what the model's own normalization layer does, done here for the loading-only figure
        return ((to_float(x) - mean) / mean).contiguous(memory_format=torch.channels_last)

    n_all = len(seed.dataset)
    print(f"threads {threads}; seed data set {n_all} images, ours (train split) {len(train)} images")
    seed_load = time_loading(seed, n_all)
    our_load = time_loading(((our_prep(x), y) for x, y in ours.epoch(64, gen)), len(train))
    print(f"loading only   seed {seed_load:10.0f} img/s   ours {our_load:10.0f} img/s   ratio {our_load / seed_load:6.1f}x")

    def model():
        torch.manual_seed(0)
        return build_model(cfg.model, (1, 28, 28), 10)

    limit = min(args.epoch_images, len(train))
    seed_epoch = time_epoch(model(), seed, lambda x: x, limit, cfg)
    ours_64 = time_epoch(model().to(memory_format=torch.channels_last), ours.epoch(64, gen),
                         lambda x: to_float(x).contiguous(memory_format=torch.channels_last), limit, cfg)
    bs = cfg.train.batch_size
    ours_bs = time_epoch(model().to(memory_format=torch.channels_last), ours.epoch(bs, gen),
                         lambda x: to_float(x).contiguous(memory_format=torch.channels_last), limit, cfg)
    print(f"training epoch seed {seed_epoch:10.0f} img/s   ours {ours_64:10.0f} img/s   ratio {ours_64 / seed_epoch:6.1f}x"
          f"   (batch 64, {cfg.model.kind} {cfg.model.cnn.channels})")
    print(f"training epoch ours at batch {bs}: {ours_bs:.0f} img/s   ratio {ours_bs / seed_epoch:.1f}x")


if __name__ == "__main__":
    main()
