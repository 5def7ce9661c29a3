"""Train an image classifier by transfer learning: a folder of labelled photos in, checkpoint.pth out.

    python train.py flowers
    python train.py flowers --save_dir checkpoints --arch vgg16 --learning_rate 0.001 \\
        --hidden_units 512 --epochs 20 --gpu
    python train.py flowers --resume checkpoints/checkpoint.pth      # after Ctrl-C or a crash
    torchrun --nproc_per_node 2 train.py flowers                      # several processes or GPUs

flowers/ holds train/ and valid/ (and optionally test/), each with one folder per class, or is
one folder of class folders that train.py splits itself (kept in save_dir/split_manifest.json). The
backbone is frozen, so each image's features are computed once (and cached on disk) and only the
small head trains each epoch; --finetune trains the backbone too, on images augmented on the fly.
"""
from flower_classifier.cli.runner import run_cli
from flower_classifier.cli.train import get_args_parser, main

if __name__ == "__main__":
    run_cli(main, get_args_parser())
