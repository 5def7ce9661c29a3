"""Export a checkpoint written by train.py as one app-facing model file, with its metadata.

    python export.py checkpoint.pth --format executorch --check photos/   # -> checkpoint.pte
    python export.py checkpoint.pth --format tflite --output flowers.tflite
    python export.py checkpoint.pth --format coreml --category_names cat_to_name.json
    python export.py checkpoint.pth --format executorch --dtype int8 --calibration data/train

Every format takes what an app has: uint8 RGB pixels of the centre crop (NHWC [N, crop, crop, 3];
Core ML: an RGB image), and does everything else predict.py does inside: scaling, normalisation,
the mirror image's features averaged in, the temperature and the softmax (flower_classifier/export/app_model.py). Outputs:
`probabilities` [N, classes] and, when the checkpoint has the unknown verdict, `similarity` [N]
(the image is none of the classes below the threshold). The class names and the threshold are
inside the file where the format allows, and always in FILE.json beside it.
"""
from flower_classifier.cli.export import get_args_parser, main
from flower_classifier.cli.runner import run_cli

if __name__ == "__main__":
    run_cli(main, get_args_parser())
