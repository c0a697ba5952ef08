"""Every registered model kind on the same data: test accuracy, training seconds and their ratio to the CNN.

Each kind trains with its own resolved settings (params.yaml, the source's recipe, `model.<kind>.train`),
capped at --epochs, on MNIST (the local mirror) and on a generated RGB ImageFolder of coloured shapes
(--rgb-size px; circles, squares and triangles on noisy backgrounds: colour and position carry no class).

    uv run python bench/model_kinds.py [--epochs 3] [--rgb-epochs 12] [--kinds cnn rescnn] [--rgb-size 48] [--tiny]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_config, machine, parser, prepared_config  # noqa: E402

from imgclf.models import KINDS  # noqa: E402

SHAPES = ("circle", "square", "triangle")


def shapes_folder(root: Path, size: int, per_class: int, seed: int = 0) -> Path:
    """An ImageFolder of RGB PNGs: one shape per image, random colours, size and position, pixel noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for label in SHAPES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            bg = tuple(int(v) for v in rng.integers(0, 256, 3))
            fg = tuple(int(v) for v in rng.integers(0, 256, 3))
            while sum(abs(a - b) for a, b in zip(bg, fg)) < 150:  # a shape must stand out from its background
                fg = tuple(int(v) for v in rng.integers(0, 256, 3))
            im = Image.new("RGB", (size, size), bg)
            r = int(rng.integers(size // 6, size // 3))
            cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
            draw = ImageDraw.Draw(im)
            if label == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
            elif label == "square":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
            noisy = np.asarray(im, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(root / label / f"{i:05d}.png")
    return root


def train_and_test(cfg) -> dict:
    """Train cfg's kind on its prepared splits; test accuracy with the one scorer (evaluate.evaluate)."""
    import torch

    from imgclf.data.batches import Batches, load_split, read_meta
    from imgclf.evaluation.scoring import evaluate
    from imgclf.models.classifier import build_model, parameter_count
    from imgclf.training.loop import fit
    from imgclf.training.runtime import resolve_device, set_threads

    set_threads(cfg.runtime.threads)
    device = resolve_device(cfg.runtime.device)
    d = Path(cfg.paths.processed_dir)
    meta = read_meta(d / "meta.json")
    train, val = (Batches(load_split(d / f"{s}.pt"), device) for s in ("train", "val"))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tuple(meta["image_shape"]), len(meta["classes"]), meta["normalization"]["mean"],
                        meta["normalization"]["std"]).to(device)
    result = fit(model, train, val, cfg.train)
    ev = evaluate(model, load_split(d / "test.pt"), meta["classes"], device=device)
    return {"accuracy": ev.accuracy, "seconds": result.seconds, "epochs": len(result.history),
            "parameters": parameter_count(model)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=3, help="at most this many epochs per kind on MNIST")
    p.add_argument("--rgb-epochs", type=int, default=12, help="... and on the RGB folder (small: cheap epochs)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--rgb-size", type=int, default=48)
    p.add_argument("--rgb-per-class", type=int, default=1000)
    args = p.parse_args()
    from imgclf.stages.download import download_stage
    from imgclf.stages.prepare import prepare_stage

    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgclf-kinds-"))
    mnist = prepared_config(args, work / "mnist")
    folder = shapes_folder(work / "shapes-src", args.rgb_size, 40 if args.tiny else args.rgb_per_class)
    rgb = bench_config(work / "shapes", [*args.overrides, "data.source=imagefolder", f"data.path={folder}",
                                         f"data.image_size={args.rgb_size}", "data.channels=3"])
    download_stage(rgb, [])
    prepare_stage(rgb)
    kinds = sorted(args.kinds, key=lambda k: k != "cnn")  # the CNN first: the others are timed against it
    print(f"machine: {machine()}; at most {args.epochs} epochs per kind on MNIST, {args.rgb_epochs} on the RGB "
          "folder", flush=True)
    print("| data | kind | test accuracy | epochs | train s | vs cnn | parameters |\n|---|---|---|---|---|---|---|")
    for name, base, epochs in (("mnist", mnist, args.epochs), ("rgb-shapes", rgb, args.rgb_epochs)):
        results: dict[str, dict] = {}
        for kind in kinds:
            work_dir = Path(base.paths.raw_dir).parent
            cfg = bench_config(work_dir, [*args.overrides, *_data_keys(base), f"model.kind={kind}"])
            cfg = bench_config(work_dir, [*args.overrides, *_data_keys(base), f"model.kind={kind}",
                                          f"train.max_epochs={min(cfg.train.max_epochs, epochs)}"])
            r = results[kind] = train_and_test(cfg)
            ratio = r["seconds"] / results["cnn"]["seconds"] if "cnn" in results else float("nan")
            print(f"| {name} | {kind} | {r['accuracy']:.2%} | {r['epochs']} | {r['seconds']:.1f} | {ratio:.2f}x | "
                  f"{r['parameters']:,} |", flush=True)


def _data_keys(cfg) -> list[str]:
    d = cfg.data
    keys = [f"data.source={d.source}", f"data.image_size={d.image_size}", f"data.channels={d.channels}"]
    return keys + ([f"data.path={d.path}"] if d.path else [])


if __name__ == "__main__":
    main()
