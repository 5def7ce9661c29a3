"""Name what is in a photo, with probabilities, using a checkpoint written by train.py.

    python predict.py flower.jpg checkpoint.pth
    python predict.py flower.jpg checkpoint.pth --top_k 5 --category_names cat_to_name.json --gpu
    python predict.py flower.jpg checkpoint.pth --top_k 5 --plot prediction.png
    python predict.py photos/ checkpoint.pth --json > predictions.jsonl   # a folder, recursively
    python predict.py photo.jpg checkpoint.pth --unknown_threshold 0.5    # or --no_unknown
    python predict.py my_test/ checkpoint.pth --report report/   # a folder of class folders, scored

A whole archive, written as it goes, resumable, on several processes, GPUs or machines
(archive.py):

    python predict.py photos/ checkpoint.pth --output preds.jsonl          # --resume after a crash
    python predict.py --file_list paths.txt checkpoint.pth --output preds.jsonl
    torchrun --nproc_per_node 4 predict.py photos/ checkpoint.pth --output preds.jsonl --gpu

A photo of none of the checkpoint's classes is reported as such: "not one of the known classes
(closest: rose 34.00%)", and "known": false in --json.
"""
import argparse
import json
import sys
from pathlib import Path

import archive
import distributed
from cli_utils import (
    HelpFormatter,
    category_names_from_flag,
    add_gpu_argument,
    non_negative_int,
    positive_int,
    run_cli,
    select_device,
)
from common import UserError, warn
from data_utils import class_folders, default_workers, list_images, list_split, load_image
from engines import ENGINE_CHOICES
from predictor import BATCH_SIZE, Predictor


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Predict the class of an image (or of every image in a folder).",
        formatter_class=HelpFormatter)
    parser.add_argument("input", nargs="?", help="an image file, or a folder of images "
                        "(searched recursively); left out with --file_list")
    parser.add_argument("checkpoint", nargs="?", help="checkpoint.pth written by train.py")
    parser.add_argument("--top_k", type=positive_int, default=1,
                        help="how many of the most likely classes to show")
    parser.add_argument("--category_names", default=None,
                        help="JSON file mapping class folder names to names, e.g. cat_to_name.json "
                        "(default: show the folder names)")
    add_gpu_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per image "
                        "(path, classes, names, probabilities, and known: false for an image of "
                        "none of the classes; known is left out when the checkpoint has no "
                        "unknown verdict or --no_unknown is given) and nothing else on stdout")
    parser.add_argument("--unknown_threshold", type=similarity, default=None, metavar="S",
                        help="cosine similarity to the nearest class's mean feature below which "
                        "an image is none of the known classes, in [-1, 1] (default: the "
                        "checkpoint's, chosen so that 95%% of its valid images pass)")
    parser.add_argument("--no_unknown", action="store_true",
                        help="no unknown verdict: always name the most likely classes")
    parser.add_argument("--plot", default=None, metavar="PNG", help="save the image above a bar "
                        "chart of the top-k names and probabilities (single image only)")
    parser.add_argument("--batch_size", type=positive_int, default=BATCH_SIZE,
                        help="images per batch for a folder")
    parser.add_argument("--workers", type=non_negative_int, default=default_workers(),
                        help="processes decoding a folder's images")
    parser.add_argument("--output", default=None, metavar="JSONL",
                        help="write predict.py --json's lines to this file, as it goes and "
                        "resumably (a first line names the model and the input; an unreadable "
                        "image gets a line with its error); the file appears, complete and "
                        "checked, at the end, and JSONL.parts/ holds the work until then; "
                        "under torchrun every process takes its share (default: print)")
    parser.add_argument("--resume", action="store_true",
                        help="with --output: predict only the images the interrupted run "
                        "has not")
    parser.add_argument("--file_list", default=None, metavar="TXT",
                        help="a text file naming one image per line (relative paths from the "
                        "current folder), instead of the input folder; needs --output")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="score a labelled folder, whose sub-folders are the checkpoint's "
                        "class folders (a test set of your own): print the accuracy and the "
                        "worst classes, and write test_report.json, confusion_matrix.png and "
                        "mistakes.png (the wrongly named photos, worst first) to DIR")
    parser.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                        help="what runs the backbone: auto takes OpenVINO on the CPU for folders "
                        "of 128 images or more, else torch (fp32 on the CPU)")
    return parser


def similarity(text):
    value = float(text)
    if not -1 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a cosine similarity in [-1, 1], got {text}")
    return value


def print_result(prediction, as_json, show_path):
    if as_json:
        print(json.dumps(prediction.as_json()), flush=True)
        return
    path, names = prediction.path, prediction.names
    unknown = prediction.known is False
    if show_path or len(names) > 1:
        print(path if show_path else f"{path}:")
    if len(names) == 1 and not show_path:
        print(f"not one of the known classes (closest: {names[0]} "
              f"{prediction.probabilities[0]:.2%})" if unknown
              else f"{names[0]}: {prediction.probabilities[0]:.2%}")
        return
    if unknown:
        print("  not one of the known classes; the closest:")
    for rank, (name, folder, probability) in enumerate(
            zip(names, prediction.classes, prediction.probabilities), 1):
        label = name if name == folder else f"{name} ({folder})"
        print(f"  {rank}. {label}  {probability:.2%}")


def set_unknown_threshold(predictor, args):
    """--no_unknown turns the verdict off; --unknown_threshold replaces the checkpoint's."""
    if args.no_unknown:
        predictor.unknown_threshold = None
    elif args.unknown_threshold is not None:
        if predictor.class_means is None:
            raise UserError(f"{args.checkpoint} has no unknown verdict (it was trained before "
                            "train.py stored class means, or fine-tuned); leave out "
                            "--unknown_threshold, or train again")
        predictor.unknown_threshold = args.unknown_threshold


def check_inputs(args):
    """The input and checkpoint positionals (only the checkpoint with --file_list), and the
    flags that go together; returns (source, its kind for archive.Archive, checkpoint)."""
    given = [value for value in (args.input, args.checkpoint) if value is not None]
    if args.file_list is not None:
        if len(given) != 1:
            raise UserError("with --file_list pass only the checkpoint: predict.py --file_list "
                            "paths.txt checkpoint.pth --output preds.jsonl")
        if args.output is None:
            raise UserError("--file_list needs --output preds.jsonl")
        if not Path(args.file_list).is_file():
            raise UserError(f"file list {args.file_list} not found; pass a text file with one "
                            "image path per line")
        return Path(args.file_list), "file_list", given[0]
    if len(given) != 2:
        raise UserError("pass an image or a folder, and a checkpoint: predict.py photos/ "
                        "checkpoint.pth")
    source = Path(args.input)
    if not source.exists():
        raise UserError(f"{source} not found; pass an image file or a folder of images")
    if args.plot and (source.is_dir() or args.output):
        raise UserError("--plot draws one image; pass an image file, not a folder, and leave "
                        "out --output")
    if args.resume and args.output is None:
        raise UserError("--resume finishes an --output file; add --output preds.jsonl")
    if args.report and (not source.is_dir() or args.output):
        raise UserError("--report scores a folder of class folders; pass a folder, and leave "
                        "out --output")
    return source, "folder" if source.is_dir() else "image", args.checkpoint


def main(args):
    """Print the predictions and return them, a list of predictor.Prediction; with --output,
    write them there and return the number of images in it (None on torchrun's other ranks)."""
    source, kind, checkpoint = check_inputs(args)
    category_names = category_names_from_flag(args.category_names)
    device = select_device(args.gpu)
    distributed.end_with_launcher()
    distributed.init_distributed(device)
    try:
        if args.output is None and distributed.world_size() > 1:
            raise UserError("under torchrun every process takes a share of the images: add "
                            "--output preds.jsonl")
        predictor = Predictor(checkpoint, device, category_names, args.engine)
        set_unknown_threshold(predictor, args)
        if args.top_k > len(predictor.classes):
            warn(f"--top_k {args.top_k} is more than the {len(predictor.classes)} classes; "
                 f"showing all {len(predictor.classes)}")
        if args.report:
            return report_on_folder(predictor, source, args)
        if args.output is None:
            return print_predictions(predictor, source, args)
        return write_predictions(predictor, source, kind, checkpoint, args)
    finally:
        distributed.close_distributed()


def write_predictions(predictor, source, kind, checkpoint, args):
    """--output: the archive run (archive.py); says on stderr what was written."""
    output = archive.Archive(Path(args.output), source, kind,
                             archive.model_identity(checkpoint, predictor, args.top_k))
    images = archive.predict_archive(output, predictor, args.resume, args.top_k,
                                     args.batch_size, args.workers)
    if images is not None:
        print(f"{output.output}: {images} images", file=sys.stderr)
    return images


def report_on_folder(predictor, source, args):
    """--report: predictions scored against the class folders they lie in; returns the report."""
    import numpy as np

    import reports

    class_to_idx = {name: index for index, name in enumerate(predictor.classes)}
    unknown = sorted(set(class_folders(source)) - set(class_to_idx))
    if unknown:
        raise UserError(f"{source} has class folders the checkpoint does not know: "
                        f"{', '.join(unknown[:5])}; --report scores a folder of its class folders "
                        f"(such as {', '.join(predictor.classes[:3])})")
    split = list_split(source, class_to_idx)
    if not split.paths:
        raise UserError(f"{source} holds no images in class folders; put each class's images in "
                        "a folder named after the class")
    paths, labels, probabilities = [], [], []
    for prediction, label in zip(predictor.predict_files(split.paths, len(class_to_idx),
                                                         args.batch_size, args.workers),
                                 split.labels):
        if prediction.ok:
            row = np.zeros(len(class_to_idx))
            row[[class_to_idx[name] for name in prediction.classes]] = prediction.probabilities
            paths.append(prediction.path)
            labels.append(label)
            probabilities.append(row)
    if not paths:
        raise UserError(f"none of the {len(split.paths)} images in {source} could be read; "
                        "pass photos such as JPEG or PNG")
    skipped = len(split.paths) - len(paths)
    if skipped:
        warn(f"skipped {skipped} unreadable images")
    probabilities = np.stack(probabilities)
    predictions = probabilities.argmax(1).tolist()
    report = reports.test_report(labels, predictions, predictor.names)
    folder = Path(args.report)
    reports.save_test_report(report, folder / "test_report.json")
    reports.plot_confusion_matrix(labels, predictions, predictor.names,
                                  folder / "confusion_matrix.png")
    wrong = reports.plot_mistakes(paths, labels, probabilities, predictor.names,
                                  folder / "mistakes.png")
    print(reports.summarize_report(report))
    print(f"saved test_report.json, confusion_matrix.png{' and mistakes.png' if wrong else ''} "
          f"in {folder}")
    return report


def print_predictions(predictor, source, args):
    """Without --output: the predictions on stdout."""
    if source.is_file():
        prediction = predictor.predict_image(source, args.top_k)
        print_result(prediction, args.json, show_path=False)
        if args.plot:
            import reports

            reports.plot_prediction(load_image(source), prediction.names,
                                    prediction.probabilities, args.plot)
            print(f"saved {args.plot}", file=sys.stderr if args.json else sys.stdout)
        return [prediction]
    paths = list_images(source)
    if not paths:
        raise UserError(f"{source} holds no images; pass a folder with JPEG or PNG files")
    results, unreadable = [], []
    for prediction in predictor.predict_files(paths, args.top_k, args.batch_size, args.workers):
        if not prediction.ok:
            unreadable.append(prediction.path)
            continue
        print_result(prediction, args.json, show_path=True)
        results.append(prediction)
    if unreadable:
        warn(f"skipped {len(unreadable)} unreadable images ({', '.join(unreadable[:3])}"
             f"{' ...' if len(unreadable) > 3 else ''})")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser())
