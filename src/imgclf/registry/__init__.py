"""The model registry: versions, aliases and production's history (versions), the promotion gate (gate), the
project's own model format and its pickle-free loader (serving, model_files)."""
