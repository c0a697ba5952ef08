"""Helpers shared by the benchmarks: real MNIST from a local mirror (or tiny generated data with --tiny),
prepared with the pipeline's own stages, in a work folder of their own.

The benchmarks never touch the repo's DVC files or MLflow store: raw data is not DVC-tracked and
tracking is off.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from imgclf import config
from imgclf.data.synthetic import make_mnist_dir
from imgclf.stages.download import download_stage
from imgclf.stages.prepare import prepare_stage

REPO = Path(__file__).resolve().parents[1]

DEFAULT_MIRROR = os.environ.get("IMGCLF_MIRROR", str(REPO.parent / "shared" / "data" / "mnist"))


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mirror", default=DEFAULT_MIRROR, help="folder or URL with the MNIST .gz files")
    p.add_argument("--workdir", default=None, help="where data goes (default: a temp dir)")
    p.add_argument("--tiny", action="store_true", help="tiny generated data, seconds not minutes (for tests)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def tiny_mnist(root: Path, n_train: int = 600, n_test: int = 200) -> None:
    """MNIST-shaped IDX files whose class is a bright band at a class-specific height (learnable in an epoch):
    imgclf.data.synthetic, so a benchmark's --tiny data is what the tests train on."""
    make_mnist_dir(root, n_train, n_test)


def prepared_config(args, work: Path | None = None, overrides: list[str] | None = None) -> config.Config:
    """Params from the repo's params.yaml, every output under a work folder, MNIST downloaded and prepared."""
    work = Path(work or args.workdir or tempfile.mkdtemp(prefix="imgclf-bench-"))
    cfg = bench_config(work, [*(overrides or []), *args.overrides])
    if args.tiny:
        tiny_mnist(work / "raw" / "mnist")
    else:
        download_stage(cfg, [args.mirror])
    prepare_stage(cfg)
    return cfg


def bench_config(work: Path, overrides: list[str]) -> config.Config:
    return config.load(REPO / "params.yaml", [
        f"paths.raw_dir={work / 'raw'}", f"paths.processed_dir={work / 'processed'}", "paths.dvc_file=null",
        f"paths.models_dir={work / 'models'}", f"paths.metrics_dir={work / 'metrics'}",
        f"paths.reports_dir={work / 'reports'}", "runtime.tracking.enabled=false", *overrides])


def machine() -> dict[str, str]:
    import torch

    from imgclf.training.runtime import available_cores

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": str(available_cores()), "torch": torch.__version__, "gpu": gpu,
            "python": platform.python_version()}
