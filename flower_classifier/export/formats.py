"""The export formats: one exporter per format, each writing one app-facing model file (atomically)
with the metadata inside where the format allows.

    export_onnx(app_model(checkpoint), example_pixels(224, 2), Path("model.onnx"), metadata)

Every exporter but TorchScript's is an optional install (requirements-export.txt, LiteRT in an
environment of its own: docs/export.md).
"""
import contextlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from flower_classifier.data.folders import list_images
from flower_classifier.data.images import UNREADABLE_IMAGE_ERRORS, load_image
from flower_classifier.export.app_model import SIMILARITY, app_pixels
from flower_classifier.utils.errors import UserError
from flower_classifier.utils.files import atomic_write, atomic_write_folder

FORMATS = {"torchscript": ".pt", "onnx": ".onnx", "executorch": ".pte", "tflite": ".tflite",
           "coreml": ".mlpackage"}
EXPORT_INSTALL = "pip install -r requirements-export.txt"
LITERT_INSTALL = ("install requirements-export-litert.txt into an environment of its own as "
                  "docs/export.md shows (Installing the exporters), and run export.py with its "
                  "python")
# format -> (module the exporter needs, how to install it)
EXPORTERS = {"onnx": ("onnx", "pip install onnx"),
             "executorch": ("executorch", EXPORT_INSTALL),
             "tflite": ("litert_torch", LITERT_INSTALL),
             "coreml": ("coremltools", EXPORT_INSTALL)}
BATCHED = ("torchscript", "onnx")  # any batch size; the phone formats take one photo
INPUT_NAME = "pixels"
METADATA_NAME = "classifier.json"  # the metadata's name inside the file, where the format allows
CALIBRATION_IMAGES = 128


def require(module, what, install):
    """Fail with one line before any work when an optional package is missing."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs the {module} package, which is not installed; {install}")


def example_pixels(crop, size=1):
    return torch.randint(0, 256, (size, crop, crop, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def exporter_failed(export_format, error):
    """The one line for an exporter's own failure: its message's first line that says something
    (ExecuTorch's begin with a blank one)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    return UserError(f"the {export_format} exporter failed ({reason}); export "
                     "with --format onnx or torchscript instead, or report the checkpoint's arch")


def export_torchscript(model, pixels, path, metadata):
    """Trace model and save it with the metadata inside (torch.jit.load's _extra_files).

    trace's own check (tracing twice and comparing) would take 5x longer than the trace; --check
    compares the saved file with predict.py instead."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        traced = torch.jit.trace(model, pixels, check_trace=False)
        atomic_write(path, lambda temporary: torch.jit.save(
            traced, str(temporary), _extra_files={METADATA_NAME: json.dumps(metadata)}))


def onnx_exporter():
    """torch's default (dynamo) ONNX exporter when onnxscript, which it needs, is installed;
    otherwise the TorchScript-based one (dynamo=False)."""
    return "dynamo" if importlib.util.find_spec("onnxscript") else "torchscript"


def export_onnx(model, pixels, path, metadata):
    """One ONNX file (weights inside) with a dynamic batch axis and the metadata in its
    metadata_props; returns the exporter used ("dynamo" or "torchscript")."""
    import onnx

    exporter = onnx_exporter()
    outputs = metadata["output_names"]
    if exporter == "dynamo":
        options = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)}
    else:
        options = {"dynamic_axes": {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}}

    def write(temporary):
        try:
            with warnings.catch_warnings(), torch.no_grad():
                # The TorchScript-based exporter is deprecated but still works.
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(model, (pixels,), str(temporary), input_names=[INPUT_NAME],
                                  output_names=outputs, dynamo=exporter == "dynamo",
                                  external_data=False, **options)
            exported = onnx.load(str(temporary))
            onnx.helper.set_model_props(exported, {METADATA_NAME: json.dumps(metadata)})
            onnx.checker.check_model(exported)
            onnx.save(exported, str(temporary))
        except OSError:
            raise  # a write failure: atomic_write says so
        except Exception as error:  # the exporter's or the checker's own failure
            raise exporter_failed(f"{exporter} ONNX", error) from None

    atomic_write(path, write)
    return exporter


def calibration_images(folder, preprocess):
    """CALIBRATION_IMAGES photos spread evenly over folder (every class of a train/ folder), as
    the app-facing model's uint8 input."""
    paths = list_images(Path(folder)) if Path(folder).is_dir() else []
    if not paths:
        raise UserError(f"--calibration {folder} holds no images; pass the training photos, "
                        "e.g. data/train")
    chosen = paths[::max(1, len(paths) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES]
    readable = []
    for path in chosen:
        try:
            readable.append(torch.from_numpy(app_pixels(load_image(path), preprocess))[None])
        except UNREADABLE_IMAGE_ERRORS:
            continue  # one bad photo does not spoil the calibration
    return readable


def quantised_int8(model, pixels, calibration):
    """The model with XNNPACK's symmetric int8 quantisation (PT2E), each ReLU6 fused into its
    convolution (export/int8_quantizer.py), its activation ranges calibrated on the
    calibration photos."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from flower_classifier.export.int8_quantizer import int8_quantizer

    prepared = prepare_pt2e(torch.export.export(model, (pixels,)).module(), int8_quantizer())
    with torch.no_grad():
        for photo in calibration:
            prepared(photo)
    return convert_pt2e(prepared)


# Lines ExecuTorch writes to stderr that say nothing to a user: XNNPACK's CPU probe (C++, on
# loading a method) and torch's deprecation of register_constant() on the Enum executorch
# registers when its XNNPACK backend is imported.
EXECUTORCH_NOISE = ("[cpuinfo_utils.cpp:", "register_constant() on Enum subclasses")


@contextlib.contextmanager
def quiet_stderr(noise=EXECUTORCH_NOISE):
    """Around a call into an exporter's native code: what it writes to stderr (the C-level file
    descriptor 2, Python's sys.stderr too) is held, and written after the call without the
    lines that contain one of `noise`: real errors and warnings still show."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held, open(held.fileno(), "w", buffering=1,
                                                 encoding="utf-8", closefd=False) as python_stderr:
        os.dup2(held.fileno(), 2)
        try:
            with contextlib.redirect_stderr(python_stderr):
                yield
        finally:
            python_stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines
                                     if not any(text in line for text in noise)))
            sys.stderr.flush()


def export_executorch(model, pixels, path, metadata, calibration=None):
    """A .pte lowered to XNNPACK, with the metadata as constant methods (class_names,
    display_names, unknown_threshold when there is a verdict, and the whole metadata as JSON)."""
    with quiet_stderr():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )
        from executorch.exir import to_edge_transform_and_lower

    constants = {"class_names": metadata["classes"], "display_names": metadata["names"],
                 "metadata_json": json.dumps(metadata)}
    if metadata["unknown_threshold"] is not None:
        constants["unknown_threshold"] = metadata["unknown_threshold"]
    try:
        with torch.no_grad(), quiet_stderr():
            if calibration is not None:
                model = quantised_int8(model, pixels, calibration)
            program = to_edge_transform_and_lower(
                torch.export.export(model, (pixels,)), partitioner=[XnnpackPartitioner()],
                constant_methods=constants).to_executorch()
    except Exception as error:  # the exporter's own failure
        raise exporter_failed("executorch", error) from None
    atomic_write(path, lambda temporary: Path(temporary).write_bytes(program.buffer))


def export_tflite(model, pixels, path, metadata):
    """A LiteRT flatbuffer, with the metadata as a flatbuffer metadata entry."""
    import litert_torch
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    try:
        with torch.no_grad():
            flatbuffer = litert_torch.convert(model, (pixels,)).model_content()
    except Exception as error:  # the exporter's own failure
        raise exporter_failed("LiteRT", error) from None
    tflite = flatbuffer_utils.read_model_from_bytearray(flatbuffer)
    tflite.buffers.append(schema.BufferT())
    tflite.buffers[-1].data = list(json.dumps(metadata).encode())
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(tflite.buffers) - 1
    tflite.metadata = [*(tflite.metadata or []), entry]
    content = flatbuffer_utils.convert_object_to_bytearray(tflite)
    atomic_write(path, lambda temporary: Path(temporary).write_bytes(content))


def tflite_metadata(path):
    """The metadata export_tflite put inside a .tflite file."""
    from ai_edge_litert.tools import flatbuffer_utils

    tflite = flatbuffer_utils.read_model(str(path))
    entry = next(entry for entry in tflite.metadata or [] if entry.name == METADATA_NAME.encode())
    return json.loads(bytes(tflite.buffers[entry.buffer].data))


def export_coreml(model, crop, path, metadata):
    """An ML Program (.mlpackage) classifier: an RGB image in, classLabel and the probabilities
    of every label (Core ML's classifier outputs) out, plus similarity when there is a verdict;
    the metadata in its user-defined metadata."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)  # Linux lacks its predict library
    import coremltools as ct

    image = torch.zeros(1, 3, crop, crop)
    verdict = metadata["unknown_threshold"] is not None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (image,)).run_decompositions({})
            converted = ct.convert(
                program,
                inputs=[ct.ImageType(name="image", shape=image.shape,
                                     color_layout=ct.colorlayout.RGB)],
                classifier_config=ct.ClassifierConfig(metadata["names"]),
                # iOS 15: from iOS 16 on, coremltools 9 makes the outputs float16 and then fails
                # to add the classifier to a model of two outputs.
                minimum_deployment_target=ct.target.iOS15)
    except Exception as error:  # the converter's own failure
        raise exporter_failed("Core ML", error) from None
    spec = converted.get_spec()
    if verdict:
        similarity = next(output.name for output in spec.description.output
                          if output.name not in ("classLabel", "classLabel_probs"))
        ct.utils.rename_feature(spec, similarity, SIMILARITY)
        converted = ct.models.MLModel(spec, weights_dir=converted.weights_dir,
                                      skip_model_load=True)
    converted.short_description = (f"{metadata['arch']} classifier of {len(metadata['classes'])}"
                                   " classes; see user-defined metadata")
    converted.user_defined_metadata[METADATA_NAME] = json.dumps(metadata)
    if verdict:
        converted.user_defined_metadata["unknown_threshold"] = str(metadata["unknown_threshold"])
    atomic_write_folder(path, converted.save)
