"""Export a checkpoint written by train.py as one self-contained model file, with its metadata.

    python export.py checkpoint.pth                                    # -> checkpoint.pt (TorchScript)
    python export.py checkpoint.pth --format onnx --output flowers.onnx --check photos/
    python export.py checkpoint.pth --output flowers.pt --category_names cat_to_name.json

The file holds backbone and head together and runs with no code of this project:
`torch.jit.load("flowers.pt")(images)` or
`onnxruntime.InferenceSession("flowers.onnx").run(None, {"images": images})`.
Its input is a float32 batch [N, 3, crop, crop], preprocessed as predict.py does (the JSON file
written beside it says how); its output is class probabilities [N, num_classes] (softmax
included). flowers.json, beside flowers.pt, lists the classes in index order, their display
names and the preprocessing constants.
"""
import argparse
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn

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
    checkpoint_classes,
    checkpoint_preprocess,
    load_checkpoint,
    model_from_checkpoint,
)
from predictor import Predictor

FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
CHECK_BATCH_SIZE = 16


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Export a checkpoint as a self-contained TorchScript or ONNX model that "
        "outputs class probabilities, with a JSON file of its classes and preprocessing.",
        formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pth written by train.py")
    parser.add_argument("--format", choices=list(FORMATS), default="torchscript",
                        help="torchscript runs with plain torch.jit.load; onnx with onnxruntime "
                        "(exporting needs the onnx package)")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="the model file to write; its metadata goes beside it as FILE's "
                        "name with .json (default: the checkpoint's name with .pt or .onnx)")
    parser.add_argument("--category_names", default=None, metavar="JSON",
                        help="JSON file mapping class folder names to display names, e.g. "
                        "cat_to_name.json, for the metadata (default: the folder names)")
    parser.add_argument("--check", default=None, metavar="IMAGE_OR_FOLDER",
                        help="after exporting, run the exported model and predict.py's model on "
                        "these images (a folder is searched recursively) and print the largest "
                        "difference of their probabilities (default: no check)")
    return parser


def exportable_model(checkpoint):
    """The trained classifier in eval mode on the CPU, followed by a softmax: images in,
    probabilities out."""
    return nn.Sequential(model_from_checkpoint(checkpoint), nn.Softmax(dim=1)).cpu().eval()


def example_batch(crop, size=2):
    return torch.zeros(size, 3, crop, crop)


def export_torchscript(model, crop, path):
    """Trace model on an example batch and save it where plain torch.jit.load reads it.

    trace's own check (tracing twice and comparing) would take 5x longer than the trace; --check
    compares the saved file with predict.py instead."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        traced = torch.jit.trace(model, example_batch(crop), check_trace=False)
        atomic_write(path, lambda temporary: torch.jit.save(traced, str(temporary)))


def onnx_exporter():
    """torch's default (dynamo) ONNX exporter when onnxscript, which it needs, is installed;
    otherwise the TorchScript-based one (dynamo=False)."""
    return "dynamo" if importlib.util.find_spec("onnxscript") else "torchscript"


def export_onnx(model, crop, path):
    """Export model to one ONNX file (weights inside) with a dynamic batch axis; returns the
    exporter used ("dynamo" or "torchscript")."""
    try:
        import onnx
    except ImportError:
        raise UserError("exporting to ONNX needs the onnx package; pip install onnx") from None
    exporter = onnx_exporter()
    if exporter == "dynamo":
        options = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)}
    else:
        options = {"dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}}

    def write(temporary):
        try:
            with warnings.catch_warnings(), torch.no_grad():
                # The TorchScript-based exporter is deprecated but still works.
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(model, (example_batch(crop),), str(temporary),
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamo=exporter == "dynamo", external_data=False, **options)
            onnx.checker.check_model(str(temporary))
        except OSError:
            raise  # a write failure: atomic_write says so
        except Exception as error:  # the exporter's or the checker's own failure
            raise UserError(f"the {exporter} ONNX exporter failed ({error_reason(error)}); "
                            "export with --format torchscript instead") from None

    atomic_write(path, write)
    return exporter


def export_metadata(checkpoint, export_format, category_names=None):
    """What a user of the exported file needs: classes in index order, their display names,
    and the preprocessing that makes its input."""
    classes = checkpoint_classes(checkpoint)
    preprocess = checkpoint_preprocess(checkpoint)
    crop = preprocess.crop
    return {
        "classes": classes,
        "names": display_names(classes, category_names or {}),
        "preprocess": preprocess.as_dict(),
        "input": f"float32 [N, 3, {crop}, {crop}], RGB, resized so the shorter side is "
                 f"{preprocess.resize} ({preprocess.interpolation}), centre-cropped to "
                 f"{crop}x{crop}, scaled to [0, 1], normalised with mean/std",
        "output": f"probabilities [N, {len(classes)}]",
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "format": export_format,
        "arch": checkpoint["arch"],
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


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed; pip install onnxruntime to check the "
                        "ONNX export") from None
    return onnxruntime


def exported_runner(exported_path, export_format):
    """A function from a float32 image batch to the exported model's probabilities."""
    if export_format == "onnx":
        session = require_onnxruntime().InferenceSession(
            str(exported_path), providers=["CPUExecutionProvider"])
        return lambda images: torch.from_numpy(session.run(None, {INPUT_NAME: images.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(exported_path), map_location="cpu")

    def run(images):
        with torch.no_grad():
            return module(images)
    return run


def parity_check(exported_path, export_format, checkpoint_path, image_paths):
    """The largest absolute difference between the exported model's probabilities and
    predict.py's on the same preprocessed images.

    The reference is a Predictor loaded from the checkpoint file, not the model just exported,
    so the check covers predict.py's own loading path too."""
    if export_format == "onnx":
        require_onnxruntime()
    predictor = Predictor(checkpoint_path, engine="torch")  # fp32, whatever the batch size
    run_exported = exported_runner(exported_path, export_format)
    largest = 0.0
    for start in range(0, len(image_paths), CHECK_BATCH_SIZE):
        images = []
        for path in image_paths[start:start + CHECK_BATCH_SIZE]:
            try:
                images.append(predictor.transform(load_image(path)))
            except UNREADABLE_IMAGE_ERRORS as error:
                raise UserError(f"cannot read image {path} ({error}); pass photos such as JPEG "
                                "or PNG files") from None
        images = torch.stack(images)
        expected = predictor.probabilities(images)
        exported = run_exported(images).float()
        if exported.shape != expected.shape:
            raise UserError(f"{exported_path} returned shape {list(exported.shape)}, expected "
                            f"{list(expected.shape)}; export the checkpoint again")
        largest = max(largest, (exported - expected).abs().max().item())
    return largest


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


def main(args):
    checkpoint = load_checkpoint(args.checkpoint)
    category_names = category_names_from_flag(args.category_names)
    image_paths = check_images(args.check) if args.check else None
    if image_paths and args.format == "onnx":
        require_onnxruntime()  # fail now, not after the export
    path, metadata_path = output_paths(args.checkpoint, args.format, args.output)
    check_category_names(category_names, checkpoint_classes(checkpoint))
    model = exportable_model(checkpoint)
    crop = checkpoint_preprocess(checkpoint).crop
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if args.format == "onnx":
            export_onnx(model, crop, path)
        else:
            export_torchscript(model, crop, path)
        write_json(export_metadata(checkpoint, args.format, category_names), metadata_path)
    except OSError as error:
        raise UserError(f"cannot write {path} ({error_reason(error)}); choose a folder you "
                        "can write to with --output") from None
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB) and {metadata_path}")
    result = {"output": str(path), "metadata": str(metadata_path), "max_difference": None}
    if image_paths:
        result["max_difference"] = parity_check(path, args.format, args.checkpoint, image_paths)
        print(f"checked on {len(image_paths)} images: largest difference from predict.py's "
              f"probabilities {result['max_difference']:.2e}")
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
