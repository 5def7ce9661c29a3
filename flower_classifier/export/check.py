"""export.py --check: the exported file, run by its format's own runtime and fed as an app would
feed it, against predict.py's answers on the same photos.

    result = parity_check(Path("model.onnx"), "onnx", "checkpoint.pth", photo_paths)
    verify(result, "float32")             # a UserError when they disagree
"""
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flower_classifier.data.folders import list_images
from flower_classifier.data.images import UNREADABLE_IMAGE_ERRORS, load_image
from flower_classifier.export.app_model import app_pixels
from flower_classifier.export.formats import (
    EXPORT_INSTALL,
    INPUT_NAME,
    LITERT_INSTALL,
    quiet_stderr,
)
from flower_classifier.inference.predictor import Predictor
from flower_classifier.utils.errors import UserError

# format -> (module --check runs it with, how to install it); Core ML has no runtime on Linux
CHECK_RUNTIMES = {"onnx": ("onnxruntime", "pip install onnxruntime"),
                  "executorch": ("executorch", EXPORT_INSTALL),
                  "tflite": ("ai_edge_litert", LITERT_INSTALL)}
# --check passes when the top-1 classes agree on this share of photos and (float32) no
# probability differs by more than MAX_DIFFERENCE.
MIN_AGREEMENT = {"float32": 0.995, "int8": 0.95}
MAX_DIFFERENCE = 0.01


def check_images(source):
    """The image files named by --check: one file, or every image below a folder."""
    source = Path(source)
    if source.is_dir():
        paths = list_images(source)
        if not paths:
            raise UserError(f"{source} holds no images; pass a folder with JPEG or PNG files")
        return paths
    if not source.is_file():
        raise UserError(f"--check {source} not found; pass an image file or a folder of images")
    return [str(source)]


def as_pair(outputs):
    """(probabilities, similarity or None) as numpy arrays, from one output or two."""
    if isinstance(outputs, (list, tuple)) and len(outputs) == 2:
        return np.asarray(outputs[0], dtype=np.float32), np.asarray(outputs[1], dtype=np.float32)
    single = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    return np.asarray(single, dtype=np.float32), None


def exported_runner(path, export_format):
    """A function from uint8 pixels [1, crop, crop, 3] to the exported file's (probabilities,
    similarity or None), run by the format's own runtime."""
    if export_format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda pixels: as_pair(session.run(None, {INPUT_NAME: pixels}))
    if export_format == "executorch":
        with quiet_stderr():  # XNNPACK's CPU probe prints five lines on loading a method
            from executorch.runtime import Runtime

            forward = Runtime.get().load_program(str(path)).load_method("forward")
        return lambda pixels: as_pair([output.numpy() for output in
                                       forward.execute([torch.from_numpy(pixels)])])
    if export_format == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        runner = Interpreter(model_path=str(path)).get_signature_runner()
        (input_name,) = runner.get_input_details()
        return lambda pixels: as_pair([value for _, value in sorted(
            runner(**{input_name: pixels}).items())])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")

    def run(pixels):
        with torch.no_grad():
            return as_pair(module(torch.from_numpy(pixels)))
    return run


@dataclass
class CheckResult:
    """How the exported model, fed as an app would, compares with predict.py."""
    images: int
    top1_agreement: float
    max_difference: float
    known_agreement: float | None  # the unknown verdict's, where there is one

    def line(self):
        known = ("" if self.known_agreement is None
                 else f", known/unknown verdict agrees on {self.known_agreement:.1%}")
        return (f"checked on {self.images} photos fed as uint8: top-1 class agrees with "
                f"predict.py on {self.top1_agreement:.1%}, largest probability difference "
                f"{self.max_difference:.2e}{known}")


def read_photo(path):
    try:
        return load_image(path)
    except UNREADABLE_IMAGE_ERRORS as error:
        raise UserError(f"cannot read image {path} ({error}); pass photos such as JPEG or PNG "
                        "files") from None


def compared_outputs(path, export_format, checkpoint_path, image_paths):
    """Yield, per photo, predict.py's (probabilities [C], known or None) and the exported
    file's (probabilities [C], known or None: its similarity against the checkpoint's
    threshold), the file fed as an app would (decoded, the shorter side resized, centre-cropped,
    uint8).

    The reference is a Predictor loaded from the checkpoint file, not the model just exported,
    so the check covers predict.py's own loading path too."""
    predictor = Predictor(checkpoint_path, engine="torch")  # fp32, whatever the batch size
    run_exported = exported_runner(path, export_format)
    for image_path in image_paths:
        photo = read_photo(image_path)
        expected, known = predictor.outputs(
            predictor.transform(load_image(image_path, predictor.preprocess.resize))[None])
        probabilities, similarity = run_exported(app_pixels(photo, predictor.preprocess)[None])
        if probabilities.shape != tuple(expected.shape):
            raise UserError(f"{path} returned shape {list(probabilities.shape)}, expected "
                            f"{list(expected.shape)}; export the checkpoint again")
        yield ((expected[0].numpy(), None if known is None else bool(known[0])),
               (probabilities[0], None if similarity is None
                else bool(similarity[0] >= predictor.unknown_threshold)))


def parity_check(path, export_format, checkpoint_path, image_paths):
    """How the exported file, fed as an app would, compares with predict.py on these photos."""
    agree, known_agree, largest = 0, [], 0.0
    for (expected, known), (probabilities, exported_known) in compared_outputs(
            path, export_format, checkpoint_path, image_paths):
        largest = max(largest, float(np.abs(probabilities - expected).max()))
        agree += int(probabilities.argmax() == expected.argmax())
        if known is not None and exported_known is not None:
            known_agree.append(exported_known == known)
    count = len(image_paths)
    return CheckResult(count, agree / count, largest,
                       sum(known_agree) / count if known_agree else None)


def coreml_labels(spec):
    """The class labels of an ML Program classifier: its classify operation's constant list."""
    main = spec.mlProgram.functions["main"]
    operations = main.block_specializations[main.opset].operations
    classify = next(operation for operation in operations if operation.type == "classify")
    labels = classify.inputs["classes"].arguments[0].value.immediateValue.list.values
    return [label.immediateValue.tensor.strings.values[0] for label in labels]


def check_coreml(path, metadata):
    """What can be checked of a Core ML model on Linux: its spec's input, outputs and labels.
    Returns the line to print."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    (image,) = spec.description.input
    crop = metadata["preprocess"]["crop"]
    size = (image.type.imageType.width, image.type.imageType.height)
    outputs = [output.name for output in spec.description.output]
    problems = []
    if size != (crop, crop) or image.type.imageType.colorSpace != image.type.imageType.RGB:
        problems.append(f"input is not an RGB image {crop}x{crop}")
    if outputs != metadata["output_names"]:
        problems.append(f"outputs are {outputs}, not {metadata['output_names']}")
    if coreml_labels(spec) != metadata["names"]:
        problems.append("its labels are not the classes' names")
    if problems:
        raise UserError(f"{path} is not the model expected: {'; '.join(problems)}; export again")
    return (f"checked {path}'s spec: RGB image {crop}x{crop} in, outputs {', '.join(outputs)}, "
            f"{len(metadata['names'])} labels; Core ML cannot predict on Linux, so its answers "
            "were not compared with predict.py (run it on a Mac)")


def verify(result, dtype):
    """Raise when the check shows the exported model does not give predict.py's answers."""
    too_different = dtype == "float32" and result.max_difference > MAX_DIFFERENCE
    if result.top1_agreement < MIN_AGREEMENT[dtype] or too_different:
        raise UserError(f"the exported model disagrees with predict.py ({result.line()}); do "
                        "not ship it: export again, or report it with the checkpoint's arch")
