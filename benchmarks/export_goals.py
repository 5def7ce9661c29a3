"""The app-facing exports against predict.py on the test split: the figures behind issue 21's goals.

    python benchmarks/export_goals.py checkpoint.pth ../shared/data/flowers102 \
        --formats onnx executorch executorch-int8              # the shared venv
    .venv-litert/bin/python benchmarks/export_goals.py checkpoint.pth ../shared/data/flowers102 \
        --formats tflite                                        # LiteRT's own environment

Per format (executorch-int8: --dtype int8 calibrated on train/): export seconds and size, then on
the test photos (every one, or --limit spread over the classes) fed as an app would (uint8 centre
crop): top-1 agreement with predict.py, the largest probability difference, the unknown
verdict's agreement, top-1 accuracy of both; then the latency of one photo through the format's
own runtime (median of LATENCY_RUNS after WARMUP_RUNS) and issue 21's goals, met or NOT met.
Timings depend on the CPU's load: compare rows of one run.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import numpy as np  # noqa: E402

from flower_classifier.cli.options import positive_int
from flower_classifier.data.folders import list_images
from flower_classifier.data.images import load_image
from flower_classifier.export import check, formats
from flower_classifier.export.app_model import app_pixels
from flower_classifier.export.run import ExportRequest, export_checkpoint, size_mb
from flower_classifier.models.checkpoint import (
    checkpoint_classes,
    checkpoint_preprocess,
    load_checkpoint,
)

VARIANTS = {"onnx": ("onnx", "float32"), "executorch": ("executorch", "float32"),
            "executorch-int8": ("executorch", "int8"), "tflite": ("tflite", "float32"),
            "torchscript": ("torchscript", "float32")}
WARMUP_RUNS, LATENCY_RUNS = 3, 30
INT8_MAX_MB, INT8_MAX_ACCURACY_DROP, PTE_LATENCY_RATIO = 5.0, 1.0, 1.5


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data_dir", help="folder with train/ (int8 calibration) and test/")
    parser.add_argument("--formats", nargs="+", choices=list(VARIANTS),
                        default=["onnx", "executorch", "executorch-int8"])
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="test photos, spread over the split (default: all)")
    return parser


def test_photos(test_dir, limit):
    paths = list_images(test_dir)
    return paths if limit is None else paths[::max(1, len(paths) // limit)][:limit]


def exported(checkpoint, variant, data_dir, folder):
    """Export one variant; (path, seconds)."""
    export_format, dtype = VARIANTS[variant]
    output = Path(folder) / f"{variant}{formats.FORMATS[export_format]}"
    calibration = str(Path(data_dir) / "train") if dtype == "int8" else None
    start = time.perf_counter()
    export_checkpoint(ExportRequest(checkpoint, export_format, dtype, str(output),
                                    calibration=calibration))
    return output, time.perf_counter() - start


def compare(checkpoint, path, export_format, photos, classes):
    """Agreement with predict.py and the accuracy of both on the labelled photos."""
    labels = [classes.index(Path(photo).parent.name) for photo in photos]
    agree = within = ours = theirs = verdicts = 0
    largest, has_verdict = 0.0, False
    for label, ((expected, known), (probabilities, exported_known)) in zip(
            labels, check.compared_outputs(path, export_format, checkpoint, photos)):
        difference = float(np.abs(probabilities - expected).max())
        largest, within = max(largest, difference), within + (difference <= 0.01)
        agree += int(probabilities.argmax() == expected.argmax())
        theirs += int(expected.argmax() == label)
        ours += int(probabilities.argmax() == label)
        if known is not None:
            has_verdict, verdicts = True, verdicts + int(exported_known == known)
    count = len(photos)
    return {"agree": agree / count, "within_0.01": within / count, "max_difference": largest,
            "verdict_agree": verdicts / count if has_verdict else None,
            "accuracy": ours / count, "predict_accuracy": theirs / count}


def latency_ms(path, export_format, photo, preprocess):
    run = check.exported_runner(path, export_format)
    pixels = app_pixels(load_image(photo), preprocess)[None]
    for _ in range(WARMUP_RUNS):
        run(pixels)
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        run(pixels)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def goals(rows):
    """Issue 21's goals that these rows can answer: (goal, met) pairs."""
    checks = []
    for variant, row in rows.items():
        if VARIANTS[variant][1] == "float32" and variant != "torchscript":
            checks.append((f"{variant}: top-1 = predict.py's on >= 99.5% ({row['agree']:.2%}), "
                           f"probabilities within 0.01 ({row['max_difference']:.1e})",
                           row["agree"] >= 0.995 and row["max_difference"] <= 0.01))
    if "executorch-int8" in rows:
        row = rows["executorch-int8"]
        drop = (row["predict_accuracy"] - row["accuracy"]) * 100
        checks.append((f"int8 .pte: accuracy within {INT8_MAX_ACCURACY_DROP} point of "
                       f"predict.py's ({drop:+.2f} points lower)", drop <= INT8_MAX_ACCURACY_DROP))
        checks.append((f"int8 .pte <= {INT8_MAX_MB} MB ({row['mb']:.1f} MB)",
                       row["mb"] <= INT8_MAX_MB))
    if "executorch" in rows and "onnx" in rows:
        ratio = rows["executorch"]["latency_ms"] / rows["onnx"]["latency_ms"]
        checks.append((f"float32 .pte latency <= {PTE_LATENCY_RATIO}x onnxruntime's "
                       f"({ratio:.2f}x)", ratio <= PTE_LATENCY_RATIO))
    return checks


def main(args):
    checkpoint = load_checkpoint(args.checkpoint)
    classes, preprocess = checkpoint_classes(checkpoint), checkpoint_preprocess(checkpoint)
    photos = test_photos(Path(args.data_dir) / "test", args.limit)
    print(f"{len(photos)} test photos; one photo's latency: median of {LATENCY_RUNS} runs")
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for variant in args.formats:
            path, seconds = exported(args.checkpoint, variant, args.data_dir, folder)
            export_format = VARIANTS[variant][0]
            row = {"export_s": seconds, "mb": size_mb(path),
                   **compare(args.checkpoint, path, export_format, photos, classes),
                   "latency_ms": latency_ms(path, export_format, photos[0], preprocess)}
            rows[variant] = row
            verdict = ("" if row["verdict_agree"] is None
                       else f"  verdict agrees {row['verdict_agree']:.2%}")
            print(f"{variant:16s} export {seconds:5.0f} s  {row['mb']:5.1f} MB  top-1 agrees "
                  f"{row['agree']:.2%}  max |dp| {row['max_difference']:.1e}  within 0.01 "
                  f"{row['within_0.01']:.2%}{verdict}  accuracy {row['accuracy']:.2%} "
                  f"(predict.py {row['predict_accuracy']:.2%})  {row['latency_ms']:.1f} ms/photo",
                  flush=True)
    for goal, met in goals(rows):
        print(f"{'met' if met else 'NOT met'}: {goal}")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
