"""Batch inference against one image at a time, with the checkout's production model (run scripts/pipeline
first) on MNIST's test images: `imgclf predict IMAGE` once per image (a process each, what a loop in a shell
does), the loaded model called once per image in one process, and `imgclf predict-batch` over a folder of
PNGs and over the IDX file (decode, score, drift check). Reads the checkout's store and data, writes
nothing to them (tracking off for the batch runs). Prints images/s and the ratios.

    uv run python bench/batch_inference.py [--mirror DIR] [--images 2000] [--calls 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclf import config
from imgclf.data.idx import IMAGES_MAGIC, read_idx
from imgclf.stages.predict import serving_model
from imgclf.stages.predict_batch import predict_batch_stage
from imgclf.training.runtime import available_cores, set_threads

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mirror", default=os.environ.get("IMGCLF_MIRROR", str(REPO.parent / "shared/data/mnist")))
    p.add_argument("--images", type=int, default=2000, help="PNG files in the folder batch")
    p.add_argument("--calls", type=int, default=5, help="`imgclf predict` processes (one image each)")
    args = p.parse_args()
    os.chdir(REPO)
    set_threads(available_cores())
    cfg = config.load("params.yaml", ["runtime.tracking.enabled=false"])
    idx = Path(args.mirror) / "t10k-images-idx3-ubyte.gz"
    images = read_idx(idx, IMAGES_MAGIC)
    work = Path(tempfile.mkdtemp(prefix="imgclf-bench-batch-"))
    folder = work / "pngs"
    folder.mkdir()
    for i in range(args.images):
        Image.fromarray(images[i]).save(folder / f"{i:05d}.png")

    t0 = time.perf_counter()
    for i in range(args.calls):
        out = subprocess.run([sys.executable, "-m", "imgclf.cli", "predict", str(folder / f"{i:05d}.png")],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
    per_call = (time.perf_counter() - t0) / args.calls

    model, uri = serving_model(cfg)
    single = images[:500, None]
    model.probabilities(single[:1])  # warm
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(len(single)):
            model.probabilities(single[i: i + 1])
    in_process = len(single) / (time.perf_counter() - t0)

    results = {}
    for name, source in (("png folder", folder), ("idx file", idx)):
        s = predict_batch_stage(cfg, str(source), out=str(work / name.replace(" ", "-")))
        results[name] = s
    print(f"model {uri}; {available_cores()} cores; torch {torch.__version__}")
    print(f"imgclf predict, one image per process ({args.calls} calls): {per_call:.2f} s per image = "
          f"{1 / per_call:.2f} images/s")
    print(f"one image per call, model loaded once: {in_process:.0f} images/s")
    for name, s in results.items():
        print(f"predict-batch {name}: {s['images']} images in {s['seconds']:.1f} s = {s['images_per_s']:.0f} images/s "
              f"end to end (decode, score, drift check, reports); scoring alone {s['score_images_per_s']:.0f} "
              f"images/s")
    best = results["idx file"]
    print(f"ratios: predict-batch (idx, end to end) / imgclf predict per image = "
          f"{best['images_per_s'] * per_call:.0f}x; scoring in batches / one image per call = "
          f"{best['score_images_per_s'] / in_process:.1f}x")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
