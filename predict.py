"""Name what is in a photo, with probabilities, using a checkpoint written by train.py.

    python predict.py flower.jpg checkpoint.pth
    python predict.py flower.jpg checkpoint.pth --top_k 5 --category_names cat_to_name.json --gpu
    python predict.py flower.jpg checkpoint.pth --top_k 5 --plot prediction.png
    python predict.py photos/ checkpoint.pth --json > predictions.jsonl   # a folder, recursively
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from cli_utils import (
    HelpFormatter,
    UserError,
    add_gpu_argument,
    non_negative_int,
    positive_int,
    progress,
    run_cli,
    select_device,
    warn,
)
from data_utils import (
    UNREADABLE_IMAGE_ERRORS,
    ImageFiles,
    check_category_names,
    display_names,
    eval_transform,
    list_images,
    load_category_names,
    load_image,
)
from features import autocast, default_workers, image_loader, inference_backbone
from model_utils import (
    ImageClassifier,
    checkpoint_classes,
    load_checkpoint,
    model_from_checkpoint,
)


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Predict the class of an image (or of every image in a folder).",
        formatter_class=HelpFormatter)
    parser.add_argument("input", help="an image file, or a folder of images (searched recursively)")
    parser.add_argument("checkpoint", help="checkpoint.pth written by train.py")
    parser.add_argument("--top_k", type=positive_int, default=1,
                        help="how many of the most likely classes to show")
    parser.add_argument("--category_names", default=None,
                        help="JSON file mapping class folder names to names, e.g. cat_to_name.json "
                        "(default: show the folder names)")
    add_gpu_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per image "
                        "(path, classes, names, probabilities) and nothing else on stdout")
    parser.add_argument("--plot", default=None, metavar="PNG", help="save the image above a bar "
                        "chart of the top-k names and probabilities (single image only)")
    parser.add_argument("--batch_size", type=positive_int, default=64,
                        help="images per batch for a folder")
    parser.add_argument("--workers", type=non_negative_int, default=default_workers(),
                        help="processes decoding a folder's images")
    return parser


def load_model(checkpoint_path, device):
    """The trained classifier in eval mode on device, with .classes (index -> class folder name)
    and .preprocess (the evaluation transform's constants) attached."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint).to(device)
    model.classes = checkpoint_classes(checkpoint)
    model.preprocess = checkpoint["preprocess"]
    return model


@torch.inference_mode()
def top_classes(model, images, top_k):
    """[(probabilities, classes)] per image in the batch, most likely first."""
    device = next(model.head.parameters()).device
    images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    with autocast(device):
        logits = model(images)
    probabilities, indices = logits.float().softmax(dim=1).topk(min(top_k, len(model.classes)))
    return [(row.tolist(), [model.classes[i] for i in index.tolist()])
            for row, index in zip(probabilities.cpu(), indices.cpu())]


def predict(image_path, model, top_k=5):
    """(probabilities, classes) of the top_k classes for one image, most likely first."""
    try:
        image = load_image(image_path)
    except UNREADABLE_IMAGE_ERRORS as error:
        raise UserError(f"cannot read image {image_path} ({error}); pass a photo such as a JPEG "
                        "or PNG file") from None
    return top_classes(model, eval_transform(model.preprocess)(image).unsqueeze(0), top_k)[0]


def predict_folder(paths, model, top_k, batch_size, workers):
    """Yield (path, probabilities, classes) per image, batched with decoding workers; an
    unreadable image yields (path, None, None)."""
    device = next(model.head.parameters()).device
    crop = model.preprocess["crop"]
    fast = ImageClassifier(inference_backbone(model.backbone, device, crop), model.head)
    fast.classes = model.classes
    dataset = ImageFiles(paths, eval_transform(model.preprocess), crop)
    loader = image_loader(dataset, batch_size, workers, device)
    position = 0
    for images, _, ok in progress(loader, len(loader), "predicting", unit="batches"):
        results = iter(top_classes(fast, images[ok], top_k) if ok.any() else [])
        for good in ok.tolist():
            probabilities, classes = next(results) if good else (None, None)
            yield paths[position], probabilities, classes
            position += 1


def print_result(path, probabilities, names, classes, as_json, show_path):
    if as_json:
        print(json.dumps({"path": str(path), "classes": classes, "names": names,
                          "probabilities": probabilities}), flush=True)
        return
    if show_path or len(names) > 1:
        print(path if show_path else f"{path}:")
    if len(names) == 1 and not show_path:
        print(f"{names[0]}: {probabilities[0]:.2%}")
        return
    for rank, (name, folder, probability) in enumerate(zip(names, classes, probabilities), 1):
        label = name if name == folder else f"{name} ({folder})"
        print(f"  {rank}. {label}  {probability:.2%}")



def main(args):
    source = Path(args.input)
    if not source.exists():
        raise UserError(f"{source} not found; pass an image file or a folder of images")
    if args.plot and source.is_dir():
        raise UserError("--plot draws one image; pass an image file, not a folder")
    category_names = load_category_names(args.category_names) if args.category_names else {}
    device = select_device(args.gpu)
    model = load_model(args.checkpoint, device)
    check_category_names(category_names, model.classes)
    if args.top_k > len(model.classes):
        warn(f"--top_k {args.top_k} is more than the {len(model.classes)} classes; showing all "
             f"{len(model.classes)}")
    if source.is_file():
        probabilities, classes = predict(source, model, args.top_k)
        names = display_names(classes, category_names)
        print_result(source, probabilities, names, classes, args.json, show_path=False)
        if args.plot:
            import reports

            reports.plot_prediction(load_image(source), names, probabilities, args.plot)
            print(f"saved {args.plot}", file=sys.stderr if args.json else sys.stdout)
        return [(str(source), probabilities, classes)]
    paths = list_images(source)
    if not paths:
        raise UserError(f"{source} holds no images; pass a folder with JPEG or PNG files")
    results, unreadable = [], []
    for path, probabilities, classes in predict_folder(paths, model, args.top_k,
                                                       args.batch_size, args.workers):
        if probabilities is None:
            unreadable.append(path)
            continue
        print_result(path, probabilities, display_names(classes, category_names), classes,
                     args.json, show_path=True)
        results.append((path, probabilities, classes))
    if unreadable:
        warn(f"skipped {len(unreadable)} unreadable images ({', '.join(unreadable[:3])}"
             f"{' ...' if len(unreadable) > 3 else ''})")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser())
