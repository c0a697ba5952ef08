"""The data's own mistakes: suspected label errors (out-of-sample probabilities by cross-validation, ranked by
confident learning) and near-duplicate images within and across the splits."""
