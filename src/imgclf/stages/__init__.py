"""One module per pipeline stage, each one function shared by the CLI (and so dvc.yaml) and the Prefect tasks.

Each stage takes the validated Config, does its I/O at the edges, and returns a small
JSON-able record with the stage's wall time as `seconds`. Nothing here imports an orchestrator.
"""
