"""Operations around the pipeline: DVC, the MLflow/Prefect server commands, the local team stack."""
