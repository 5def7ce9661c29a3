"""What train.py, predict.py and export.py share on the command line: one-line errors, the device
choice, progress reporting and atomic file writes.

    from cli_utils import UserError, run_cli
    if __name__ == "__main__":
        run_cli(main, get_args_parser())
"""
import argparse
import errno
import json
import math
import os
import signal
import sys
import time
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits non-zero."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run stops cleanly, keeping what it saved."""
    exit_code = 143


def _raise_interrupted(signum, frame):
    raise Interrupted()


def error_reason(error):
    """What went wrong, in a few words: the system's error text, else the first line of the
    message, else the exception's name."""
    lines = str(error).splitlines() or [type(error).__name__]
    return getattr(error, "strerror", None) or lines[0]


def warn(message):
    """One line on stderr; under torchrun only from rank 0, so N processes warn once."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


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
        if action.default is None or action.default is False:
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


def atomic_write(path, write):
    """Call write(temporary_path), then rename it over path, so a crash never leaves half a file.
    path's folder is created if missing."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch's zip writer raises RuntimeError
        code = getattr(error, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT):
            fix = "free some disk space"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR):
            fix = "choose a folder you can write to"  # EEXIST, ENOTDIR: a file where a folder goes
        else:
            fix = "free some disk space or choose a folder you can write to"
        raise UserError(f"cannot write {path} ({error_reason(error)}); {fix}") from None
    finally:
        if os.path.lexists(temporary):  # not there when the folder could not be made
            temporary.unlink()


def write_json(data, path):
    """data as indented UTF-8 JSON, written atomically."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def progress(iterable, total, description, unit="it"):
    """A tqdm bar on a terminal; plain periodic lines otherwise, so logs and CI stay readable."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=description, unit=unit, leave=False)
        return
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= 15 or done == total:
            last = now
            print(f"{description}: {done}/{total} {unit} ({now - start:.0f} s)", file=sys.stderr,
                  flush=True)
