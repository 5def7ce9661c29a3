"""What the command lines' flags share: help formatting, argument types, --gpu and the device,
--category_names, and the flag's wording added to a library error.

    parser.add_argument("--epochs", type=positive_int, default=None)
    add_gpu_argument(parser)
    device = select_device(args.gpu)
"""
import argparse
import math
import os
from contextlib import contextmanager

from flower_classifier.utils.console import warn
from flower_classifier.utils.errors import UserError
from flower_classifier.utils.threads import (
    THREADS_VARIABLE,
    ThreadPolicy,
    check_threads,
    default_threads,
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except None and off switches, whose help says what they mean."""

    def _get_help_string(self, action):
        if action.default is None or False in (action.default, action.const):  # store_false too
            return action.help
        return super()._get_help_string(action)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, got {text}")
    return value


def probability(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_gpu_argument(parser):
    """`--gpu`, also accepting the `--gpu gpu` / `--gpu cuda` spelling of the assignment's tutorials."""
    parser.add_argument(
        "--gpu", nargs="?", const="gpu", default=None, choices=["gpu", "cuda"],
        help="use the CUDA GPU when present (default: the CPU); `--gpu gpu` is accepted too")


def add_category_names_argument(parser):
    """`--category_names` of the commands that use a checkpoint (predict.py, serve.py)."""
    parser.add_argument("--category_names", default=None,
                        help="JSON file mapping class folder names to names, e.g. cat_to_name.json "
                        "(default: the names the checkpoint kept from training, else the folder "
                        "names)")


def add_threads_argument(parser):
    """`--threads N`: the CPU threads of the model (default: the cores other processes leave
    free, read again between training epochs)."""
    parser.add_argument(
        "--threads", type=positive_int, default=default_threads(), metavar="N",
        help="CPU threads the model uses (default: the cores no other process is busy on, read "
        "at the start and again after each training epoch, shared among torchrun's processes; "
        f"${THREADS_VARIABLE} sets another default)")


def use_threads(threads):
    """The --threads value applied now (a fixed count, or the free cores); returns the count.
    More threads than cores is a warning."""
    return ThreadPolicy(check_threads(threads)).apply()


def select_device(use_gpu):
    """The CUDA device when asked for and present; otherwise the CPU, with one warning line."""
    import torch

    if not use_gpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        warn("--gpu: no CUDA GPU found (Apple MPS is present but not supported); using the CPU")
    else:
        warn("--gpu: no CUDA GPU found; using the CPU")
    return torch.device("cpu")


CATEGORY_NAMES_FIX = ("pass a JSON file such as cat_to_name.json, or leave out "
                      "--category_names")


@contextmanager
def about_flag(hint):
    """Add the command line's wording to a library error: the library names the problem, the
    CLI says which flag fixes it."""
    try:
        yield
    except UserError as error:
        raise UserError(f"{error}; {hint}") from None


def category_names_from_flag(path):
    """--category_names' mapping, {} when the flag is left out; a bad file is one error line
    that says how to do without it."""
    from flower_classifier.data.class_names import load_category_names

    if path is None:
        return {}
    with about_flag(CATEGORY_NAMES_FIX):
        return load_category_names(path)


def similarity(text):
    value = float(text)
    if not -1 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a cosine similarity in [-1, 1], got {text}")
    return value
