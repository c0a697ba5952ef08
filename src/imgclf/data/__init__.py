"""Data sources and their raw files, decoding, splits and the batches training reads.

The prepared folder's file names are here, light to import: layout (and so every stage) names them without
importing the decoders.
"""

META_FILE = "meta.json"  # beside the splits: what prepare read, and with which params


def split_file(name: str) -> str:
    return f"{name}.pt"
