"""Writes that a crash never leaves half done: a temporary file (or folder) renamed into place.

    from flower_classifier.utils.files import atomic_write, write_json
    atomic_write("out/model.pth", lambda temporary: torch.save(state, temporary))
    write_json({"accuracy": 0.97}, "out/report.json")
    save_dir = new_run_folder("runs/train")     # runs/train, else runs/train2, runs/train3, ...
"""
import errno
import json
import os
import shutil
import threading
from pathlib import Path

from flower_classifier.utils.errors import UserError, error_reason


def new_run_folder(base):
    """The first of base, base2, base3, ... that does not exist yet (not created here): each
    run gets a folder of its own, as Ultralytics' runs/train, runs/train2, ..."""
    base = Path(base)
    number = 1
    while (folder := base if number == 1 else base.with_name(f"{base.name}{number}")).exists():
        number += 1
    return folder


def write_failure(path, error):
    """The UserError for a failed write of path, naming the likely fix."""
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some disk space"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR):
        fix = "choose a folder you can write to"  # EEXIST, ENOTDIR: a file where a folder goes
    else:
        fix = "free some disk space or choose a folder you can write to"
    return UserError(f"cannot write {path} ({error_reason(error)}); {fix}")


def writer_id():
    """Process and thread: two threads writing the same file (a thumbnail asked for while the
    background makes it) each write their own temporary file."""
    return f"{os.getpid()}.{threading.get_ident()}"


def atomic_write(path, write):
    """Call write(temporary_path), then rename it over path, so a crash never leaves half a file.
    path's folder is created if missing."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{writer_id()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch's zip writer raises RuntimeError
        raise write_failure(path, error) from None
    finally:
        if os.path.lexists(temporary):  # not there when the folder could not be made
            temporary.unlink()


def atomic_write_folder(path, write):
    """atomic_write for a folder (a .mlpackage): write(temporary) then a rename over path.
    temporary keeps path's ending, which Core ML's save requires."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{writer_id()}.tmp{path.suffix}")
    old = path.with_name(f".{path.name}.{writer_id()}.old")
    try:
        write(str(temporary))
        if path.exists():
            os.replace(path, old)
        os.replace(temporary, path)
    except OSError as error:
        raise write_failure(path, error) from None
    finally:
        for leftover in (temporary, old):
            shutil.rmtree(leftover, ignore_errors=True)


def write_json(data, path):
    """data as indented UTF-8 JSON, written atomically."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
