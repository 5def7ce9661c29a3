"""What the command lines share: one-line errors and exit codes, help formatting, argument types
and the device choice. Library code uses common.py instead.

    from cli_utils import run_cli
    if __name__ == "__main__":
        run_cli(main, get_args_parser())
"""
import argparse
import math
import os
import signal
import sys
from contextlib import contextmanager

from common import UserError, error_reason, warn


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run stops cleanly, keeping what it saved."""
    exit_code = 143


def _raise_interrupted(signum, frame):
    raise Interrupted()


def run_cli(main, parser, argv=None):
    """Run main(args) and turn user errors and interrupts into one line and an exit code."""
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        main(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        sys.exit(getattr(interrupt, "exit_code", 130))
    except BrokenPipeError:  # stdout closed early, as by `| head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except RuntimeError as error:  # torch.OutOfMemoryError is one; anything else is a bug
        if type(error).__name__ != "OutOfMemoryError":
            raise
        print(f"error: out of GPU memory ({error_reason(error)}); lower --batch_size, or "
              "run without --gpu", file=sys.stderr)
        sys.exit(2)


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
    from data_utils import load_category_names  # imports torch: only where the flag is used

    if path is None:
        return {}
    with about_flag(CATEGORY_NAMES_FIX):
        return load_category_names(path)
