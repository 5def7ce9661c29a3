"""predict.py's command line: a photo, a folder, a file list or a whole archive through the
Predictor, printed, written resumably, or scored against its class folders.

    python predict.py flower.jpg checkpoint.pth --top_k 5    # the usage: predict.py's docstring
"""
import argparse
import json
import sys
from pathlib import Path

from flower_classifier.cli.options import (
    HelpFormatter,
    add_category_names_argument,
    add_gpu_argument,
    add_threads_argument,
    category_names_from_flag,
    non_negative_int,
    positive_int,
    select_device,
    similarity,
    use_threads,
)
from flower_classifier.cli.runner import run_cli
from flower_classifier.data.folders import list_images
from flower_classifier.data.images import load_image
from flower_classifier.data.loading import default_workers
from flower_classifier.inference.bulk import Archive, model_identity, predict_archive
from flower_classifier.inference.predictor import BATCH_SIZE, Predictor
from flower_classifier.inference.scoring import score_folder
from flower_classifier.inference.sort_into import MANIFEST, sort_into
from flower_classifier.inference.suggest import BY, MAX_SIMILARITY, Tally, suggest_photos
from flower_classifier.models.engines import ENGINE_CHOICES
from flower_classifier.models.explain import explain_image, explainable
from flower_classifier.reports.evaluation import evaluation_lines
from flower_classifier.reports.plots import plot_prediction
from flower_classifier.utils import distributed
from flower_classifier.utils.console import warn
from flower_classifier.utils.errors import UserError
from flower_classifier.utils.files import atomic_write


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Predict the class of an image (or of every image in a folder).",
        formatter_class=HelpFormatter)
    parser.add_argument("input", nargs="?", help="an image file, or a folder of images "
                        "(searched recursively); left out with --file_list")
    parser.add_argument("checkpoint", nargs="?", help="checkpoint.pth written by train.py")
    parser.add_argument("--top_k", type=positive_int, default=1,
                        help="how many of the most likely classes to show")
    add_category_names_argument(parser)
    add_gpu_argument(parser)
    add_threads_argument(parser)
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
    parser.add_argument("--heatmap", action="store_true", help="with --plot: draw the image's "
                        "centre crop with the Grad-CAM heatmap of the top class over it (where "
                        "the model looked; red most)")
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
                        help="with --output or --sort_into: predict only the images the "
                        "interrupted run has not")
    parser.add_argument("--file_list", default=None, metavar="TXT",
                        help="a text file naming one image per line (relative paths from the "
                        "current folder), instead of the input folder; needs --output")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="score a labelled folder, whose sub-folders are the checkpoint's "
                        "class folders (a test set of your own): print the accuracy and the "
                        "worst classes, and write test_report.json, confusion_matrix.png, "
                        "mistakes.png and mistakes.html (the wrongly named photos, worst first; "
                        "the page with heatmaps of where the model looked) to DIR")
    parser.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                        help="what runs the backbone: auto takes OpenVINO on the CPU for folders "
                        "of 128 images or more, else torch (fp32 on the CPU)")
    parser.add_argument("--sort_into", default=None, metavar="DIR",
                        help="pre-labelling: link each photo of the input folder into "
                        "DIR/<predicted class name>/ (DIR/unknown/ for what the unknown verdict "
                        "rejects; a hard link or a copy where links fail; the originals stay), "
                        f"and write DIR/{MANIFEST}: each photo's top max(K, 2) classes, "
                        "probability and margin, or its error; DIR must be empty, or the run "
                        "to continue with --resume")
    parser.add_argument("--suggest", type=positive_int, default=None, metavar="N",
                        help="list the N photos of the input folder a label would teach most: "
                        "the least sure, never two near-copies, grouped by predicted class "
                        "(path, name, certainty per line; --json: objects; --output: a JSON-"
                        "lines file)")
    parser.add_argument("--suggest_by", choices=BY, default="margin",
                        help="with --suggest: the certainty, the top two classes' margin or "
                        "one less the normalised entropy")
    parser.add_argument("--suggest_similarity", type=similarity, default=MAX_SIMILARITY,
                        metavar="S", help="with --suggest: the cosine similarity of backbone "
                        "features above which a photo is a near-copy of one already chosen")
    return parser


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


def set_unknown_threshold(predictor, checkpoint, no_unknown, threshold):
    """--no_unknown turns the verdict off; --unknown_threshold replaces the checkpoint's."""
    if no_unknown:
        predictor.unknown_threshold = None
    elif threshold is not None:
        if predictor.class_means is None:
            raise UserError(f"{checkpoint} has no unknown verdict (it was trained before "
                            "train.py stored class means, or fine-tuned); leave out "
                            "--unknown_threshold, or train again")
        predictor.unknown_threshold = threshold


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
    if args.heatmap and not args.plot:
        raise UserError("--heatmap draws on --plot's image; add --plot out.png")
    if args.resume and args.output is None and args.sort_into is None:
        raise UserError("--resume finishes an --output file or a --sort_into folder; add "
                        "--output preds.jsonl")
    if args.report and (not source.is_dir() or args.output):
        raise UserError("--report scores a folder of class folders; pass a folder, and leave "
                        "out --output")
    return source, "folder" if source.is_dir() else "image", args.checkpoint


def check_modes(args, source):
    """--sort_into and --suggest: a folder, and none of the flags of the other modes."""
    mode = "--sort_into" if args.sort_into else "--suggest" if args.suggest else None
    if mode is None:
        return
    if args.sort_into and args.suggest:
        raise UserError("--sort_into and --suggest are two runs; pass one of them")
    if not source.is_dir():
        raise UserError(f"{mode} takes a folder of photos; pass a folder, not {source}")
    clashes = [flag for flag, given in (("--plot", args.plot), ("--report", args.report),
                                        ("--output", args.output and args.sort_into),
                                        ("--resume", args.resume and args.suggest))
               if given]
    if clashes:
        raise UserError(f"{mode} does not go with {clashes[0]}; leave it out")


def main(args):
    """Print the predictions and return them, a list of Prediction; with --output, write them
    there and return the number of images in it (None on torchrun's other ranks); --sort_into
    returns its photos per folder, --suggest its list of Suggestion."""
    source, kind, checkpoint = check_inputs(args)
    check_modes(args, source)
    category_names = category_names_from_flag(args.category_names)
    device = select_device(args.gpu)
    distributed.end_with_launcher()
    distributed.init_distributed(device)
    try:
        if (args.output is None or args.suggest) and distributed.world_size() > 1:
            raise UserError("under torchrun every process takes a share of the images: add "
                            "--output preds.jsonl or --sort_into DIR")
        use_threads(args.threads)
        predictor = Predictor(checkpoint, device, category_names, args.engine)
        set_unknown_threshold(predictor, checkpoint, args.no_unknown, args.unknown_threshold)
        if args.top_k > len(predictor.classes):
            warn(f"--top_k {args.top_k} is more than the {len(predictor.classes)} classes; "
                 f"showing all {len(predictor.classes)}")
        if args.sort_into:
            return sort_photos(predictor, checkpoint, source, args)
        if args.suggest:
            return print_suggestions(predictor, source, args)
        if args.report:
            return report_on_folder(predictor, source, Path(args.report), args.batch_size,
                                    args.workers)
        if args.output is None and source.is_file():
            return [print_one(predictor, source, args.top_k, args.json, args.plot, args.heatmap)]
        if args.output is None:
            return print_folder(predictor, source, args.top_k, args.json, args.batch_size,
                                args.workers)
        archive = Archive(Path(args.output), source, kind,
                          model_identity(checkpoint, predictor, args.top_k))
        return write_predictions(predictor, archive, args.resume, args.top_k, args.batch_size,
                                 args.workers)
    finally:
        distributed.close_distributed()


def write_predictions(predictor, archive, resume, top_k, batch_size, workers):
    """--output: the archive run (inference/bulk.py); says on stderr what was written."""
    images = predict_archive(archive, predictor, resume, top_k, batch_size, workers)
    if images is not None:
        print(f"{archive.output}: {images} images", file=sys.stderr)
    return images


def sort_photos(predictor, checkpoint, source, args):
    """--sort_into: the photos linked into folders by predicted class (inference/sort_into.py);
    says on stderr how many went where."""
    model = model_identity(checkpoint, predictor, max(args.top_k, 2))
    counts = sort_into(predictor, source, args.sort_into, model, args.resume, args.batch_size,
                       args.workers)
    if counts is not None:
        folders = {folder: photos for folder, photos in counts.items() if folder}
        note = f", {counts['']} unreadable (see {MANIFEST})" if counts[""] else ""
        print(f"{args.sort_into}: {sum(folders.values())} photos in {len(folders)} folders"
              f"{note}", file=sys.stderr)
    return counts


def print_suggestions(predictor, source, args):
    """--suggest: the photos worth labelling, printed grouped by class (or written to
    --output as JSON lines); returns the list of Suggestion."""
    tally = Tally()
    suggestions = suggest_photos(predictor, source, args.suggest, args.suggest_by,
                                 args.suggest_similarity, top_k=max(args.top_k, 2),
                                 batch_size=args.batch_size, workers=args.workers, tally=tally)
    lines = [json.dumps(suggestion.as_json()) if args.json or args.output
             else f"{suggestion.path}\t{suggestion.name}\t{suggestion.certainty:.3f}"
             for suggestion in suggestions]
    if args.output:
        atomic_write(args.output, lambda temporary: Path(temporary).write_text(
            "".join(line + "\n" for line in lines), encoding="utf-8"))
    elif lines:
        print("\n".join(lines), flush=True)
    print(f"{len(suggestions)} of {tally.photos} photos suggested ({args.suggest_by}; "
          f"{tally.unknown} of none of the classes and {tally.unreadable} unreadable left out)",
          file=sys.stderr)
    return suggestions


def report_on_folder(predictor, source, folder, batch_size, workers):
    """--report: predictions scored against the class folders they lie in; returns the report."""
    evaluation = score_folder(predictor, source, folder, batch_size, workers)
    print("\n".join(evaluation_lines(evaluation, folder)))
    return evaluation.report


def print_folder(predictor, source, top_k, as_json, batch_size, workers):
    """Without --output: a folder's predictions on stdout, as they come."""
    paths = list_images(source)
    if not paths:
        raise UserError(f"{source} holds no images; pass a folder with JPEG or PNG files")
    results, unreadable = [], []
    for prediction in predictor.predict_files(paths, top_k, batch_size, workers):
        if not prediction.ok:
            unreadable.append(prediction.path)
            continue
        print_result(prediction, as_json, show_path=True)
        results.append(prediction)
    if unreadable:
        warn(f"skipped {len(unreadable)} unreadable images ({', '.join(unreadable[:3])}"
             f"{' ...' if len(unreadable) > 3 else ''})")
    return results


def print_one(predictor, path, top_k, as_json, plot, heatmap=False):
    """One photo's prediction printed, and drawn into the PNG plot names (None: not drawn);
    heatmap: the image drawn is the centre crop with the top class's Grad-CAM over it."""
    if heatmap and not explainable(predictor.model):
        raise UserError("--heatmap needs a pretrained backbone; the network trained from "
                        "scratch (--arch cnn) has no maps to weigh: leave out --heatmap")
    prediction = predictor.predict_image(path, top_k)
    print_result(prediction, as_json, show_path=False)
    if plot:
        image = load_image(path)
        if heatmap:
            image = explain_image(predictor.model, predictor.transform, image,
                                  list(predictor.classes).index(prediction.classes[0])).overlay()
        plot_prediction(image, prediction.names, prediction.probabilities, plot)
        print(f"saved {plot}", file=sys.stderr if as_json else sys.stdout)
    return prediction


def run(argv=None):
    """The console command (pyproject.toml), as `python predict.py`."""
    run_cli(main, get_args_parser(), argv)
