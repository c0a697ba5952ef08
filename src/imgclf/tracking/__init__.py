"""MLflow: the store, runs, lineage, the registry and its gate, the safe model format and loader."""
