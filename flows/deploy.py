"""Create the deployments (the server at PREFECT_API_URL, work pools already made):

- training-pipeline/mnist-cnn and training-pipeline/mnist-mlp on the pipeline pool (default `default`),
  training dispatched to the train pool (default `gpu`; --train-pool '' trains in the pipeline's process);
- train/<train pool> on the train pool: the flow a worker on a GPU machine runs.

    uv run python -m flows.deploy [--pipeline-pool default] [--train-pool gpu] [--params params.yaml]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

REPO = Path(__file__).resolve().parents[1]


def deploy(pipeline_pool: str = "default", train_pool: str = "gpu", params: str = "params.yaml") -> list[str]:
    created = []
    for kind in ("cnn", "mlp"):
        base = {"model.kind": kind, **({"orchestration.train_pool": train_pool} if train_pool else {})}
        pipeline = flow.from_source(source=str(REPO), entrypoint="flows/pipeline.py:training_pipeline")
        created.append(str(pipeline.deploy(
            name=f"mnist-{kind}", work_pool_name=pipeline_pool, print_next_steps=False,
            parameters={"params_path": params, "base_overrides": base},
            description=f"download → prepare → train ({kind}) → evaluate → register")))
    if train_pool:
        train = flow.from_source(source=str(REPO), entrypoint="flows/pipeline.py:train_flow")
        created.append(str(train.deploy(name=train_pool, work_pool_name=train_pool, print_next_steps=False,
                                        parameters={"params_path": params},
                                        description="the train stage, run by a worker in this pool")))
    return created


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline-pool", default="default")
    p.add_argument("--train-pool", default="gpu")
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args()
    for dep in deploy(args.pipeline_pool, args.train_pool, args.params):
        print(f"deployment {dep}")


if __name__ == "__main__":
    main()
