"""predict: classify image files with a registered model (every file checked before the model is loaded)."""

from __future__ import annotations

from typing import Optional

from ..config import Config


def predict_stage(cfg: Config, paths: list[str], model_uri: Optional[str] = None) -> list[dict]:
    from ..serving import LoadedModel, check_images
    from ..tracking import tracking_uri

    check_images(paths)  # a bad file is reported before minutes of model loading
    model = LoadedModel(model_uri or f"models:/{cfg.model_name}@production", tracking_uri(cfg.tracking))
    probs = model.probabilities(model.load_images(paths))
    return [{"file": str(p), "class": model.classes[int(row.argmax())], "probability": float(row.max())}
            for p, row in zip(paths, probs)]
