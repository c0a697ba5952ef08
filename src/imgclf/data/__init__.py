"""Data sources and their raw files, decoding, splits and the batches training reads."""
