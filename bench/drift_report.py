"""The drift detectors on four 10,000-image batches, with the checkout's production model (run scripts/pipeline
first): MNIST's test split as it is, rotated 90°, inverted, and Fashion-MNIST's test images (Debian's
dataset-fashion-mnist). Prints one markdown row per batch: each detector's statistics and verdict. Tracking
is off: nothing is written to the checkout's store; outputs go to a temp folder.

    uv run python bench/drift_report.py [--mirror DIR] [--fashion DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from imgclf import config
from imgclf.data.idx import IMAGES_MAGIC, read_idx, write_idx
from imgclf.stages.predict_batch import predict_batch_stage

REPO = Path(__file__).resolve().parents[1]


def row(name: str, report: dict, summary: dict) -> str:
    d = report["detectors"]
    stats, emb, cls = d["image_stats"], d["embeddings"], d["classes"]
    flag = lambda x: "**flag**" if x["drifted"] else "ok"  # noqa: E731
    return (f"| {name} | {'**drift**' if report['drifted'] else 'no drift'} | "
            + ", ".join(f"{k} p={t['p_value']:.2g} shift {t['shift']:.2f}" for k, t in stats["tests"].items())
            + f" → {flag(stats)} | MMD² {emb['mmd2']:.4f} p={emb['mmd_p_value']:.3f}; AUC {emb['domain_auc']:.3f} "
            f"p={emb['domain_auc_p_value']:.2g} → {flag(emb)} | TVD {cls['tvd']:.3f} χ² p={cls['p_value']:.2g} → "
            f"{flag(cls)} | {summary['images_per_s']:.0f} ({summary['score_images_per_s']:.0f}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mirror", default=os.environ.get("IMGCLF_MIRROR", str(REPO.parent / "shared/data/mnist")))
    p.add_argument("--fashion", default="/usr/share/datasets/fashion-mnist")
    args = p.parse_args()
    os.chdir(REPO)
    cfg = config.load("params.yaml", ["runtime.tracking.enabled=false"])
    test = read_idx(Path(args.mirror) / "t10k-images-idx3-ubyte.gz", IMAGES_MAGIC)
    batches = {"MNIST test": test, "rotated 90°": np.rot90(test, 1, (1, 2)), "inverted": 255 - test}
    fashion = Path(args.fashion) / "t10k-images-idx3-ubyte.gz"
    if fashion.is_file():
        batches["Fashion-MNIST test"] = read_idx(fashion, IMAGES_MAGIC)
    work = Path(tempfile.mkdtemp(prefix="imgclf-bench-drift-"))
    rows = []
    for i, (name, images) in enumerate(batches.items()):
        source = work / f"batch{i}-idx3-ubyte"
        write_idx(source, np.ascontiguousarray(images))
        summary = predict_batch_stage(cfg, str(source), out=str(work / f"out{i}"))
        rows.append(row(name, json.loads((work / f"out{i}" / "drift.json").read_text()), summary))
    print("| batch (10,000 images) | verdict | image statistics (KS p, shift in sd) | embeddings (MMD, domain "
          "classifier) | predicted classes | images/s end to end (scoring) |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
