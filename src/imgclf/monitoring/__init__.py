"""Monitoring the model in use: batch inputs (inputs.py), probabilities and embeddings in one pass
(embeddings.py), drift against the training data (drift.py) and its report (drift_report.py); its settings, the
`monitor` section (settings.py). No Prefect here; flows/monitor.py wraps it."""
