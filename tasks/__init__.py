"""Thin Prefect task wrappers over the imgclf stage functions."""
