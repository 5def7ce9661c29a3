"""The package's commands run as child processes (the studio's final model and its camera
try-out): importable however the parent was started, stopped as Ctrl-C stops them, and ending
when their parent is gone, even killed with SIGKILL (cli.runner calls end_with_parent).

    process = subprocess.Popen(module_command("flower_classifier.cli.train", "photos/"),
                               env=package_environment())
    stop_process(process)
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # where flower_classifier/ is found
STOP_WAIT = 30  # seconds a command gets to stop cleanly (SIGTERM) before it is killed
PARENT_VARIABLE = "FLOWER_CLASSIFIER_PARENT_PID"  # set by package_environment
PARENT_POLL = 1.0  # seconds between a child's looks at whether its parent is still there


def module_command(module, *arguments):
    """python -m module arguments, with this Python."""
    return [sys.executable, "-m", module, *map(str, arguments)]


def package_environment():
    """This environment, with the package importable however the parent was started (from
    another folder, not installed), and the child's output unbuffered (read line by line)."""
    paths = [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1",
            PARENT_VARIABLE: str(os.getpid())}


def end_with_parent(poll=PARENT_POLL):
    """In a command started with package_environment(): SIGTERM to itself (a clean stop) once
    the process that started it is gone, looked at every poll seconds from a thread; a no-op
    in any other process. (PR_SET_PDEATHSIG would follow the thread that started the child,
    and the studio starts them from request threads that come and go.)"""
    parent = os.environ.pop(PARENT_VARIABLE, "")
    if not parent.isdigit():
        return

    def watch():
        while os.getppid() == int(parent):
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True, name="end-with-parent").start()


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
