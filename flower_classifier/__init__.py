"""Train an image classifier on your own photos, and use it.

    from flower_classifier import Predictor
    predictor = Predictor("checkpoints/checkpoint.pth")
    prediction = predictor.predict_image("flower.jpg", top_k=5)
    prediction.names, prediction.probabilities          # most likely first

    from flower_classifier import TrainConfig, train
    result = train(TrainConfig("photos", save_dir="runs/photos"), torch.device("cpu"))

The package's layers, each importing only those before it: utils, data, models, reports,
datacheck, training and inference, export and serve, and cli (the commands at the project's
root). The names above are imported when first used, so `import flower_classifier` is cheap.
"""
import importlib

__version__ = "1.0.0"

_EXPORTS = {"Predictor": "flower_classifier.inference.predictor",
            "Prediction": "flower_classifier.inference.predictor",
            "TrainConfig": "flower_classifier.training.config",
            "train": "flower_classifier.training.run",
            "load_checkpoint": "flower_classifier.models.checkpoint"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flower_classifier' has no attribute {name!r}")
