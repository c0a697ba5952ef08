"""Hyperparameter search: an Optuna study whose trials are trainings of this pipeline (see runner.py)."""
