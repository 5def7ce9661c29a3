"""export.py's command line: its flags become an ExportRequest for export.run.export_checkpoint.

    python export.py checkpoint.pth --format onnx     # the usage: export.py's docstring
"""
import argparse

from flower_classifier.cli.options import HelpFormatter, category_names_from_flag
from flower_classifier.cli.runner import run_cli
from flower_classifier.export.check import MAX_DIFFERENCE, MIN_AGREEMENT
from flower_classifier.export.formats import CALIBRATION_IMAGES, FORMATS
from flower_classifier.export.run import ExportRequest, export_checkpoint


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


def main(args):
    return export_checkpoint(ExportRequest(
        args.checkpoint, args.format, args.dtype, args.output,
        category_names_from_flag(args.category_names), args.calibration, args.check))


def run(argv=None):
    """The console command (pyproject.toml), as `python export.py`."""
    run_cli(main, get_args_parser(), argv)
