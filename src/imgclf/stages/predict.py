"""predict: classify image files with a registered model (every file checked before the model is loaded);
answers under evaluate.low_confidence are flagged."""

from __future__ import annotations

import re
from typing import Optional

from ..config import Config


def serving_model(cfg: Config, model_uri: Optional[str] = None):
    """The model a prediction uses (default: production of the configured registered model) and the URI that
    names the exact version that answered."""
    from ..registry.serving import LoadedModel
    from ..tracking.store import registered_models_summary, tracking_uri

    uri = tracking_uri(cfg.tracking)
    try:
        model = LoadedModel(model_uri or f"models:/{cfg.model_name}@production", uri)
    except LookupError as exc:
        if model_uri is not None or type(exc) is not LookupError:
            raise
        raise LookupError(f"{exc}; {registered_models_summary(uri)}; choose one with --model-uri "
                          "models:/NAME@production, or set data.source / register.model_name") from None
    named = re.fullmatch(r"models:/([^/@]+)(?:@[\w-]+|/\d+)", model.uri)  # an alias names the version it meant
    answered = f"models:/{named.group(1)}/{model.version}" if named and model.version else model.uri
    return model, answered


def predict_stage(cfg: Config, paths: list[str], model_uri: Optional[str] = None) -> list[dict]:
    from ..registry.serving import check_images

    check_images(paths)  # a bad file is reported before minutes of model loading
    model, answered = serving_model(cfg, model_uri)
    probs = model.probabilities(model.load_images(paths))
    # Calibrated probabilities (the model's fitted temperature), so the threshold means what it says.
    threshold = cfg.evaluate.low_confidence
    return [{"file": str(p), "class": model.classes[int(row.argmax())], "probability": float(row.max()),
             "model": answered, "low_confidence": bool(row.max() < threshold)} for p, row in zip(paths, probs)]
