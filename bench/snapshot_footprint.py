"""Disk footprint and time of an ImageFolder data set under the download stage and DVC: copies against links.

Writes Fashion-MNIST as PNGs into a class-per-folder tree (all 70,000 by default; Debian's
dataset-fashion-mnist or --source-dir with the four .gz files), then, in a fresh git + DVC repository
per mode, runs `imgclf download` (snapshot, `dvc commit`, push to a local remote) twice. For each
mode it prints the bytes on disk of the source, data/raw, the DVC cache and the remote together,
each inode counted once, as a multiple of the source's own size, and the seconds of both runs.

- copies: runtime.link=copy and cache.type=copy (what the project did before: four copies);
- links: the defaults (runtime.link=auto: reflink where possible, else copy; cache.type=hardlink,copy);
- hardlink: runtime.link=hardlink (the snapshot shares the source's files).

    uv run python bench/snapshot_footprint.py [--n 70000] [--source-dir DIR] [--tiny]
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
import yaml
from PIL import Image

from imgclf.data.idx import read_pair
from imgclf.data.sources import FASHION_MNIST

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
MODES = {"copies": ("copy", "copy"), "links": ("auto", "hardlink,copy"), "hardlink": ("hardlink", "hardlink,copy")}


def write_pngs(src: Path, out: Path, n: int) -> int:
    images, labels = read_pair(src / FASHION_MNIST.train[0].name, src / FASHION_MNIST.train[1].name)
    test_x, test_y = read_pair(src / FASHION_MNIST.test[0].name, src / FASHION_MNIST.test[1].name)
    images, labels = np.concatenate([images, test_x])[:n], np.concatenate([labels, test_y])[:n]
    names = [c.replace("/", "-") for c in FASHION_MNIST.classes]
    for c in names:
        (out / c).mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(images, labels)):
        Image.fromarray(img[0]).save(out / names[lab] / f"{i:05d}.png")
    return len(labels)


def footprint(*roots: Path) -> int:
    """Bytes allocated on disk under `roots`, each inode once (hard links share blocks)."""
    seen, total = set(), 0
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                st = os.lstat(os.path.join(dirpath, f))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def run_mode(mode: str, source: Path, work: Path) -> dict:
    link, cache_type = MODES[mode]
    repo = work / mode
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@e", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "b@e"}

    def sh(*cmd: str) -> None:
        out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{mode}: {' '.join(cmd)}: {(out.stderr or out.stdout).strip()[-800:]}")

    sh("git", "init", "-q")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    sh(sys.executable, "-m", "dvc", "config", "cache.type", cache_type)
    sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(work / f"{mode}-remote"))
    params = {"data": {"source": "imagefolder", "path": str(source)},
              "runtime": {"link": link, "tracking": {"enabled": False}}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        sh(sys.executable, "-m", "imgclf.cli", "download")
        seconds.append(time.perf_counter() - t0)
    size = footprint(source, repo / "data", repo / ".dvc" / "cache", work / f"{mode}-remote")
    return {"mode": mode, "bytes": size, "first_s": seconds[0], "again_s": seconds[1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=70000)
    p.add_argument("--source-dir", type=Path, default=DEBIAN)
    p.add_argument("--tiny", action="store_true", help="300 images: seconds, for tests; figures mean nothing")
    args = p.parse_args()
    n = 300 if args.tiny else args.n
    with tempfile.TemporaryDirectory(prefix="imgclf-footprint-") as tmp:
        work = Path(tmp)
        source_dir = args.source_dir
        if args.tiny and not (source_dir / FASHION_MNIST.test[1].name).is_file():
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from _common import tiny_mnist  # same file names as Fashion-MNIST's

            source_dir = work / "idx"
            tiny_mnist(source_dir)
        t0 = time.perf_counter()
        count = write_pngs(source_dir, work / "fashion-png", n)
        source_bytes = footprint(work / "fashion-png")
        print(f"{count} PNGs, {source_bytes / 1e6:.1f} MB on disk, written in {time.perf_counter() - t0:.0f} s")
        for mode in MODES:
            r = run_mode(mode, work / "fashion-png", work)
            print(f"{mode:>8}: {r['bytes'] / 1e6:7.1f} MB = {r['bytes'] / source_bytes:.2f}x the source; "
                  f"download {r['first_s']:.1f} s, again {r['again_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
