"""What every module shares: the error a user can fix, warnings, progress lines and atomic
file writes. Library code imports from here; cli_utils adds what only the command lines need.

    from common import UserError, atomic_write, warn
    atomic_write("out/model.pth", lambda temporary: torch.save(state, temporary))
"""
import errno
import json
import os
import sys
import time
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits non-zero."""


def error_reason(error):
    """What went wrong, in a few words: the system's error text, else the first line of the
    message, else the exception's name."""
    lines = str(error).splitlines() or [type(error).__name__]
    return getattr(error, "strerror", None) or lines[0]


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
            rate = done / max(now - start, 1e-9)
            print(f"{description}: {done}/{total} {unit} ({now - start:.0f} s, {rate:.1f} "
                  f"{unit}/s, ETA {(total - done) / rate:.0f} s)", file=sys.stderr, flush=True)

