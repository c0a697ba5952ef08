"""imgclf serve: the registered model online (batching, health, metrics, a model that follows its alias)."""
