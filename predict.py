"""Name what is in a photo, with probabilities, using a checkpoint written by train.py.

    python predict.py flower.jpg checkpoint.pth
    python predict.py flower.jpg checkpoint.pth --top_k 5 --category_names cat_to_name.json --gpu
    python predict.py flower.jpg checkpoint.pth --top_k 5 --plot prediction.png
    python predict.py photos/ checkpoint.pth --json > predictions.jsonl   # a folder, recursively
    python predict.py photo.jpg checkpoint.pth --unknown_threshold 0.5    # or --no_unknown
    python predict.py my_test/ checkpoint.pth --report report/   # a folder of class folders, scored

A whole archive, written as it goes, resumable, on several processes, GPUs or machines
(flower_classifier/inference/bulk.py):

    python predict.py photos/ checkpoint.pth --output preds.jsonl          # --resume after a crash
    python predict.py --file_list paths.txt checkpoint.pth --output preds.jsonl
    torchrun --nproc_per_node 4 predict.py photos/ checkpoint.pth --output preds.jsonl --gpu

A photo of none of the checkpoint's classes is reported as such: "not one of the known classes
(closest: rose 34.00%)", and "known": false in --json.
"""
from flower_classifier.cli.predict import get_args_parser, main
from flower_classifier.cli.runner import run_cli

if __name__ == "__main__":
    run_cli(main, get_args_parser())
