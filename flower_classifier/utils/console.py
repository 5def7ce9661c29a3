"""Lines for the person at the terminal: warnings, progress, once per torchrun job.

    from flower_classifier.utils.console import log, warn, progress
    warn("the category names file has no name for 3 of 102 classes")
    for batch in progress(loader, len(loader), "extracting", unit="batches"): ...
"""
import os
import sys
import time


def on_first_rank():
    """True without torchrun and on its rank 0 (read from torchrun's environment, so it holds
    before the process group exists): where warnings and log lines are printed once."""
    return int(os.environ.get("WORLD_SIZE", 1)) <= 1 or os.environ.get("RANK", "0") == "0"


def warn(message):
    """One line on stderr; under torchrun only from rank 0, so N processes warn once."""
    if on_first_rank():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def log(message):
    """One progress line on stdout; under torchrun only from rank 0, so N processes log once."""
    if on_first_rank():
        print(message, flush=True)


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
            rate = done / max(now - start, 1e-9)
            print(f"{description}: {done}/{total} {unit} ({now - start:.0f} s, {rate:.1f} "
                  f"{unit}/s, ETA {(total - done) / rate:.0f} s)", file=sys.stderr, flush=True)
