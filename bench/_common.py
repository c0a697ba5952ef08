"""Helpers shared by the benchmarks: real MNIST from a local mirror, prepared with the pipeline's own stages."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from imgclf import config
from imgclf.stages.download import download_stage
from imgclf.stages.prepare import prepare_stage

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MIRROR = os.environ.get("IMGCLF_MIRROR", str(REPO.parent / "shared" / "data" / "mnist"))


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--mirror", default=DEFAULT_MIRROR, help="folder or URL with the MNIST .gz files")
    p.add_argument("--workdir", default=None, help="where data goes (default: a temp dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def prepared_config(args) -> config.Config:
    """Params from the repo's params.yaml, data under a work dir, MNIST downloaded and prepared.

    Never touches the repo's DVC files or MLflow store: raw data is not DVC-tracked, tracking is off."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgclf-bench-"))
    overrides = [f"data.raw_dir={work / 'raw'}", f"data.processed_dir={work / 'processed'}", "data.dvc_file=null",
                 f"train.out_dir={work / 'models'}", f"train.metrics_dir={work / 'metrics'}",
                 f"evaluate.out_dir={work / 'reports'}", "tracking.enabled=false", *args.overrides]
    cfg = config.load(REPO / "params.yaml", overrides)
    download_stage(cfg, [args.mirror])
    prepare_stage(cfg)
    return cfg
