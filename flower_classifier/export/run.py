"""Export a checkpoint as one app-facing model file with its metadata, and check it: the library
behind export.py.

    from flower_classifier.export.run import ExportRequest, export_checkpoint
    result = export_checkpoint(ExportRequest("checkpoint.pth", "onnx", check="photos/"))
    result["output"], result["metadata"], result["check"]
"""
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flower_classifier.data.class_names import check_category_names
from flower_classifier.export.app_model import app_model
from flower_classifier.export.check import (
    CHECK_RUNTIMES,
    check_coreml,
    check_images,
    parity_check,
    verify,
)
from flower_classifier.export.formats import (
    BATCHED,
    EXPORTERS,
    FORMATS,
    calibration_images,
    example_pixels,
    export_coreml,
    export_executorch,
    export_onnx,
    export_tflite,
    export_torchscript,
    require,
)
from flower_classifier.export.metadata import export_metadata
from flower_classifier.models.backbones import SCRATCH_ARCH
from flower_classifier.models.checkpoint import (
    checkpoint_arch,
    checkpoint_classes,
    checkpoint_preprocess,
    load_checkpoint,
)
from flower_classifier.utils.console import log, warn
from flower_classifier.utils.errors import UserError, error_reason
from flower_classifier.utils.files import write_json


@dataclass(frozen=True)
class ExportRequest:
    """One export: the checkpoint, the format and dtype, where the file goes (default: the
    checkpoint's name with the format's ending), the display names, the int8 calibration
    photos' folder and the photos of the check (an image or a folder; None: no check)."""
    checkpoint: str
    format: str = "torchscript"
    dtype: str = "float32"
    output: str | None = None
    category_names: dict = field(default_factory=dict)
    calibration: str | None = None
    check: str | None = None


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


def check_request(request, checkpoint):
    """Every flag problem and missing package, before any work."""
    if request.dtype == "int8" and checkpoint_arch(checkpoint) == SCRATCH_ARCH:
        raise UserError(f"--dtype int8 does not work for --arch {SCRATCH_ARCH}: XNNPACK refuses "
                        "its quantised convolutions, which the network runs twice (mirror); "
                        "leave out --dtype (its float32 .pte is under 5 MB)")
    if request.dtype == "int8" and request.format != "executorch":
        raise UserError("--dtype int8 is for --format executorch only; leave it out for "
                        f"{request.format}")
    if request.dtype == "int8" and not request.calibration:
        raise UserError("--dtype int8 needs --calibration with training photos, e.g. "
                        "--calibration data/train")
    if request.format in EXPORTERS:
        module, install = EXPORTERS[request.format]
        require(module, f"--format {request.format}", install)
    if request.check and request.format in CHECK_RUNTIMES:
        module, install = CHECK_RUNTIMES[request.format]
        require(module, f"--check of --format {request.format}", install)


def write_model(request, checkpoint, path, metadata):
    """Export to path in request.format (the int8 calibration photos read first)."""
    preprocess = checkpoint_preprocess(checkpoint)
    if request.format == "coreml":
        export_coreml(app_model(checkpoint, channels_first=True), preprocess.crop, path,
                      metadata)
        return
    model = app_model(checkpoint)
    pixels = example_pixels(preprocess.crop, 2 if request.format in BATCHED else 1)
    if request.format == "executorch":
        calibration = (calibration_images(request.calibration, preprocess)
                       if request.dtype == "int8" else None)
        export_executorch(model, pixels, path, metadata, calibration)
    elif request.format == "tflite":
        export_tflite(model, pixels, path, metadata)
    elif request.format == "onnx":
        export_onnx(model, pixels, path, metadata)
    else:
        export_torchscript(model, pixels, path, metadata)


def size_mb(path):
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(file.stat().st_size for file in files if file.is_file()) / 1e6


def export_checkpoint(request):
    """Export, write the metadata beside the file, then check it when asked; returns {"output",
    "metadata", "check": the check's figures or None}. Every problem with the request, and a
    missing package, fails before any work."""
    checkpoint = load_checkpoint(request.checkpoint)
    check_request(request, checkpoint)
    image_paths = check_images(request.check) if request.check else None
    path, metadata_path = output_paths(request.checkpoint, request.format, request.output)
    check_category_names(request.category_names, checkpoint_classes(checkpoint))
    metadata = export_metadata(checkpoint, request.format, request.category_names, request.dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write {path} ({error_reason(error)}); choose a folder you "
                        "can write to with --output") from None
    write_model(request, checkpoint, path, metadata)
    write_json(metadata, metadata_path)
    log(f"saved {path} ({size_mb(path):.1f} MB) and {metadata_path}")
    result = {"output": str(path), "metadata": str(metadata_path), "check": None}
    if image_paths and request.format == "coreml":
        log(check_coreml(path, metadata))
    elif image_paths:
        check = parity_check(path, request.format, request.checkpoint, image_paths)
        result["check"] = asdict(check)
        log(check.line())
        verify(check, request.dtype)
    return result
