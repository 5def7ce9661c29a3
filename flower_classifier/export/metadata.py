"""What an app needs to know of an exported model: its classes and their names, the input it
feeds, the outputs' meaning and the unknown verdict's threshold (FILE.json beside the model).

    metadata = export_metadata(checkpoint, "onnx", category_names)
"""
from flower_classifier.data.class_names import display_names
from flower_classifier.export.app_model import PROBABILITIES, SIMILARITY, output_names
from flower_classifier.export.formats import BATCHED, INPUT_NAME
from flower_classifier.models.checkpoint import (
    checkpoint_arch,
    checkpoint_classes,
    checkpoint_names,
    checkpoint_preprocess,
    checkpoint_temperature,
    optional,
    unknown_verdict,
)


def input_metadata(export_format, preprocess):
    crop = preprocess.crop
    prepare = (f"RGB, the shorter side resized to {preprocess.resize} "
               f"({preprocess.interpolation}), centre-cropped to {crop}x{crop}; nothing else "
               "(scaling and normalisation are inside the model)")
    if export_format == "coreml":
        return {"name": "image", "type": f"RGB image {crop}x{crop}", "prepare": prepare}
    batch = "N" if export_format in BATCHED else 1
    return {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC",
            "shape": [batch, crop, crop, 3], "prepare": prepare}


def export_metadata(checkpoint, export_format, category_names=None, dtype="float32"):
    """What an app needs: classes in index order, their display names, the input it feeds, the
    outputs' meaning and the unknown verdict's threshold. Names: category_names where given,
    else the checkpoint's own (models.checkpoint.checkpoint_names)."""
    classes = checkpoint_classes(checkpoint)
    verdict = unknown_verdict(checkpoint)
    outputs = {PROBABILITIES: f"[N, {len(classes)}] calibrated class probabilities, classes in "
                              "index order"}
    if verdict:
        outputs[SIMILARITY] = ("[N] cosine similarity to the nearest class mean: below "
                               "unknown_threshold the photo is none of the classes")
    if export_format == "coreml":
        outputs = {"classLabel": "the most likely display name",
                   "classLabel_probs": "{display name: probability}",
                   **({SIMILARITY: outputs[SIMILARITY]} if verdict else {})}
    return {
        "classes": classes,
        "names": display_names(classes, checkpoint_names(checkpoint, category_names)),
        "input": input_metadata(export_format, checkpoint_preprocess(checkpoint)),
        "outputs": outputs,
        "output_names": list(outputs) if export_format == "coreml" else output_names(checkpoint),
        "unknown_threshold": verdict[1] if verdict else None,
        "preprocess": checkpoint_preprocess(checkpoint).as_dict(),
        "temperature": checkpoint_temperature(checkpoint),
        "mirror": bool(optional(checkpoint, "mirror")),
        "format": export_format,
        "dtype": dtype,
        "arch": checkpoint_arch(checkpoint),
    }
