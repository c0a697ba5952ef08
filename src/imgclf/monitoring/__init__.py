"""Monitoring the model in use: batch inputs (inputs.py), scoring with embeddings (scoring.py), drift against
the training data (drift.py) and its report (report.py). No Prefect here; flows/inference.py wraps it."""
