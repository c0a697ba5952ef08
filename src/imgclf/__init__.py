"""imgclf: an image-classifier pipeline library (no orchestration imports)."""
