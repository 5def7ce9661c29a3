"""Export a checkpoint written by train.py as one app-facing model file, with its metadata.

    python export.py checkpoint.pth --format executorch --check photos/   # -> checkpoint.pte
    python export.py checkpoint.pth --format tflite --output flowers.tflite
    python export.py checkpoint.pth --format coreml --category_names cat_to_name.json
    python export.py checkpoint.pth --format executorch --dtype int8 --calibration data/train

Every format takes what an app has: uint8 RGB pixels of the centre crop (NHWC [N, crop, crop, 3];
Core ML: an RGB image), and does everything else predict.py does inside: scaling, normalisation,
the mirror image's features averaged in, the temperature and the softmax (app_model.py). Outputs:
`probabilities` [N, classes] and, when the checkpoint has the unknown verdict, `similarity` [N]
(the image is none of the classes below the threshold). The class names and the threshold are
inside the file where the format allows, and always in FILE.json beside it.
"""
import argparse
import importlib.util
import json
import logging
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from app_model import PROBABILITIES, SIMILARITY, app_model, app_pixels, output_names
from backbones import SCRATCH_ARCH
from cli_utils import HelpFormatter, category_names_from_flag, run_cli
from common import UserError, atomic_write, error_reason, warn, write_json
from data_utils import (
    UNREADABLE_IMAGE_ERRORS,
    check_category_names,
    display_names,
    list_images,
    load_image,
)
from model_utils import (
    checkpoint_arch,
    checkpoint_classes,
    checkpoint_preprocess,
    checkpoint_temperature,
    load_checkpoint,
    optional,
    unknown_verdict,
)
from predictor import Predictor

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
# format -> (module --check runs it with, how to install it); Core ML has no runtime on Linux
CHECK_RUNTIMES = {"onnx": ("onnxruntime", "pip install onnxruntime"),
                  "executorch": ("executorch", EXPORT_INSTALL),
                  "tflite": ("ai_edge_litert", LITERT_INSTALL)}
BATCHED = ("torchscript", "onnx")  # any batch size; the phone formats take one photo
INPUT_NAME = "pixels"
METADATA_NAME = "classifier.json"  # the metadata's name inside the file, where the format allows
CALIBRATION_IMAGES = 128
# --check passes when the top-1 classes agree on this share of photos and (float32) no
# probability differs by more than MAX_DIFFERENCE.
MIN_AGREEMENT = {"float32": 0.995, "int8": 0.95}
MAX_DIFFERENCE = 0.01


class OneLineErrors(argparse.ArgumentParser):
    """A bad flag (an unknown --format) is one line, exit 2, as every other user error."""

    def error(self, message):
        self.exit(2, f"error: {message}; see python export.py --help\n")


def get_args_parser():
    parser = OneLineErrors(
        description="Export a checkpoint as one model file for an app: uint8 RGB pixels in, "
        "calibrated probabilities (and the unknown verdict's similarity) out, with a JSON file "
        "of its classes, input and outputs beside it.",
        formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pth written by train.py")
    parser.add_argument("--format", choices=list(FORMATS), default="torchscript",
                        help="torchscript (torch.jit.load) and onnx (onnxruntime) for servers; "
                        "executorch (.pte, XNNPACK), tflite (LiteRT) and coreml (.mlpackage) "
                        "for phones; each exporter but torchscript's is an optional install "
                        "(docs/export.md)")
    parser.add_argument("--dtype", choices=["float32", "int8"], default="float32",
                        help="int8: post-training quantisation with XNNPACK's quantiser, each "
                        "ReLU6 fused into its convolution, calibrated on --calibration photos "
                        "(executorch only)")
    parser.add_argument("--calibration", default=None, metavar="FOLDER",
                        help=f"training photos that calibrate --dtype int8 ({CALIBRATION_IMAGES} "
                        "spread over the folder, searched recursively; default: none)")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="the model file to write; its metadata goes beside it as FILE's "
                        "name with .json (default: the checkpoint's name with the format's "
                        "ending)")
    parser.add_argument("--category_names", default=None, metavar="JSON",
                        help="JSON file mapping class folder names to display names, e.g. "
                        "cat_to_name.json, for the labels (default: the folder names)")
    parser.add_argument("--check", default=None, metavar="IMAGE_OR_FOLDER",
                        help="after exporting, feed these photos to the exported model with the "
                        "format's own runtime as an app would (shorter side resized, centre "
                        "crop, uint8) and compare with predict.py; exit 2 when they disagree "
                        f"(top-1 on less than {MIN_AGREEMENT['float32']:.1%} of photos or a "
                        f"probability off by more than {MAX_DIFFERENCE}; int8: top-1 on less than "
                        f"{MIN_AGREEMENT['int8']:.0%}). Core ML's spec only: it cannot predict "
                        "on Linux (default: no check)".replace("%", "%%"))
    return parser


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
    convolution (int8_quantizer.py), its activation ranges calibrated on the calibration photos."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from int8_quantizer import int8_quantizer

    prepared = prepare_pt2e(torch.export.export(model, (pixels,)).module(), int8_quantizer())
    with torch.no_grad():
        for photo in calibration:
            prepared(photo)
    return convert_pt2e(prepared)


def export_executorch(model, pixels, path, metadata, calibration=None):
    """A .pte lowered to XNNPACK, with the metadata as constant methods (class_names,
    display_names, unknown_threshold when there is a verdict, and the whole metadata as JSON)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    constants = {"class_names": metadata["classes"], "display_names": metadata["names"],
                 "metadata_json": json.dumps(metadata)}
    if metadata["unknown_threshold"] is not None:
        constants["unknown_threshold"] = metadata["unknown_threshold"]
    try:
        with torch.no_grad():
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


def atomic_write_folder(path, write):
    """atomic_write for a folder (a .mlpackage): write(temporary) then a rename over path.
    temporary keeps path's ending, which Core ML's save requires."""
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    try:
        write(str(temporary))
        if path.exists():
            os.replace(path, old)
        os.replace(temporary, path)
    except OSError as error:
        raise UserError(f"cannot write {path} ({error_reason(error)}); free some disk space or "
                        "choose a folder you can write to") from None
    finally:
        for leftover in (temporary, old):
            shutil.rmtree(leftover, ignore_errors=True)


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
    outputs' meaning and the unknown verdict's threshold."""
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
        "names": display_names(classes, category_names or {}),
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


def output_paths(checkpoint_path, export_format, output):
    """The model file and its metadata file (the model's name with .json)."""
    path = Path(output) if output else Path(checkpoint_path).with_suffix(FORMATS[export_format])
    metadata = path.with_suffix(".json")
    if metadata == path:
        raise UserError(f"--output {path} would be overwritten by its own metadata {metadata}; "
                        f"name the model file with {FORMATS[export_format]}")
    if path.suffix != FORMATS[export_format]:
        warn(f"--output {path} does not end in {FORMATS[export_format]}, the usual ending of "
             f"{export_format} files")
    if path.resolve() == Path(checkpoint_path).resolve():
        raise UserError(f"--output {path} is the checkpoint itself; choose another file name")
    return path, metadata


def check_flags(args, checkpoint):
    """Every flag problem and missing package, before any work."""
    if args.dtype == "int8" and checkpoint_arch(checkpoint) == SCRATCH_ARCH:
        raise UserError(f"--dtype int8 does not work for --arch {SCRATCH_ARCH}: XNNPACK refuses "
                        "its quantised convolutions, which the network runs twice (mirror); "
                        "leave out --dtype (its float32 .pte is under 5 MB)")
    if args.dtype == "int8" and args.format != "executorch":
        raise UserError("--dtype int8 is for --format executorch only; leave it out for "
                        f"{args.format}")
    if args.dtype == "int8" and not args.calibration:
        raise UserError("--dtype int8 needs --calibration with training photos, e.g. "
                        "--calibration data/train")
    if args.format in EXPORTERS:
        module, install = EXPORTERS[args.format]
        require(module, f"--format {args.format}", install)
    if args.check and args.format in CHECK_RUNTIMES:
        module, install = CHECK_RUNTIMES[args.format]
        require(module, f"--check of --format {args.format}", install)


def write_model(args, checkpoint, path, metadata):
    """Export to path in args.format (the int8 calibration photos read first)."""
    preprocess = checkpoint_preprocess(checkpoint)
    if args.format == "coreml":
        export_coreml(app_model(checkpoint, channels_first=True), preprocess.crop, path,
                      metadata)
        return
    model = app_model(checkpoint)
    pixels = example_pixels(preprocess.crop, 2 if args.format in BATCHED else 1)
    if args.format == "executorch":
        calibration = (calibration_images(args.calibration, preprocess)
                       if args.dtype == "int8" else None)
        export_executorch(model, pixels, path, metadata, calibration)
    elif args.format == "tflite":
        export_tflite(model, pixels, path, metadata)
    elif args.format == "onnx":
        export_onnx(model, pixels, path, metadata)
    else:
        export_torchscript(model, pixels, path, metadata)


def size_mb(path):
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(file.stat().st_size for file in files if file.is_file()) / 1e6


def main(args):
    checkpoint = load_checkpoint(args.checkpoint)
    check_flags(args, checkpoint)
    category_names = category_names_from_flag(args.category_names)
    image_paths = check_images(args.check) if args.check else None
    path, metadata_path = output_paths(args.checkpoint, args.format, args.output)
    check_category_names(category_names, checkpoint_classes(checkpoint))
    metadata = export_metadata(checkpoint, args.format, category_names, args.dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write {path} ({error_reason(error)}); choose a folder you "
                        "can write to with --output") from None
    write_model(args, checkpoint, path, metadata)
    write_json(metadata, metadata_path)
    print(f"saved {path} ({size_mb(path):.1f} MB) and {metadata_path}")
    result = {"output": str(path), "metadata": str(metadata_path), "check": None}
    if image_paths and args.format == "coreml":
        print(check_coreml(path, metadata))
    elif image_paths:
        check = parity_check(path, args.format, args.checkpoint, image_paths)
        result["check"] = asdict(check)
        print(check.line())
        verify(check, args.dtype)
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
