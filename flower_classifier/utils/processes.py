"""The package's commands run as child processes (the studio's final model and its camera
try-out): importable however the parent was started, and stopped as Ctrl-C stops them.

    process = subprocess.Popen(module_command("flower_classifier.cli.train", "photos/"),
                               env=package_environment())
    stop_process(process)
"""
import os
import subprocess
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # where flower_classifier/ is found
STOP_WAIT = 30  # seconds a command gets to stop cleanly (SIGTERM) before it is killed


def module_command(module, *arguments):
    """python -m module arguments, with this Python."""
    return [sys.executable, "-m", module, *map(str, arguments)]


def package_environment():
    """This environment, with the package importable however the parent was started (from
    another folder, not installed), and the child's output unbuffered (read line by line)."""
    paths = [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def stop_process(process, wait=STOP_WAIT):
    """SIGTERM (the commands stop cleanly on it, keeping what they saved), then SIGKILL past
    wait seconds; nothing for a process that has ended or is None."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(wait)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
