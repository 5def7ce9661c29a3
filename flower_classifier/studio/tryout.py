"""Trying the final model with a phone's camera: serve.py on its checkpoint, in a process of its
own, bound as the studio is (its host, token and origins) on a free port; the page links to
serve.py's page, which takes photos from the camera.

    tryout = CameraTryOut(config, device)        # the studio's serve.config.ServeConfig
    tryout.start("studio/final/checkpoint.pth")  # "http://192.168.1.5:41234/#token=..."
    tryout.stop()
"""
import queue
import re
import subprocess
import threading
import time
from pathlib import Path

from flower_classifier.serve.answers import BadRequest
from flower_classifier.utils.processes import module_command, package_environment, stop_process

ADDRESS = re.compile(r"^serving \d+ classes at (http://\S+)")  # serve_until_stopped's line
START_TIMEOUT = 180  # seconds serve.py gets to load the model and say where it is


def serve_command(config, device, checkpoint):
    """python -m flower_classifier.cli.serve as a user would run serve.py on the checkpoint,
    for one person's camera: photos one at a time, on the model as it is (--engine torch
    --max_batch 1). Converting the new model for OpenVINO and warming every batch size would
    keep the try-out waiting four times as long (benchmarks/README.md) to save milliseconds
    per photo."""
    command = module_command("flower_classifier.cli.serve", checkpoint, "--host", config.host,
                             "--port", 0, "--engine", "torch", "--max_batch", 1)
    if config.token:
        command += ["--token", config.token]
    for origin in config.allowed_origins:
        command += ["--allow_origin", origin]
    if device.type == "cuda":
        command.append("--gpu")
    return command


class CameraTryOut:
    """At most one serve.py at a time, on the checkpoint asked for last; none once stopped for
    good (close)."""

    def __init__(self, config, device):
        self.config, self.device, self.lock = config, device, threading.Lock()
        self.process = self.url = self.serving = None
        self.closed = False

    def start(self, checkpoint):
        """serve.py's address once it serves checkpoint (the running one when it serves that
        file as it is now); a sentence as BadRequest when it cannot start."""
        checkpoint = Path(checkpoint)
        try:
            serving = (str(checkpoint.resolve()), checkpoint.stat().st_mtime_ns)
        except OSError:
            raise BadRequest(409, "There is no final model yet; train it first.") from None
        with self.lock:
            if self.closed:
                raise BadRequest(503, "The studio is stopping.")
            if self.serving == serving and self.process.poll() is None:
                return self.url
            self.stop_locked()
            lines = queue.Queue()
            self.process = subprocess.Popen(
                serve_command(self.config, self.device, checkpoint), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, errors="replace",
                env=package_environment())
            threading.Thread(target=drain, args=(self.process.stdout, lines), daemon=True,
                             name="camera-try-out").start()
            try:
                self.url = address(lines)
            except BaseException:
                self.stop_locked()  # not left serving what the page never learnt of
                raise
            self.serving = serving
            return self.url

    def stop(self, close=False):
        """Stop serve.py; close: and start none again (the studio is stopping)."""
        with self.lock:
            self.closed = self.closed or close
            self.stop_locked()

    def stop_locked(self):
        stop_process(self.process)
        self.process = self.serving = None


def drain(stream, lines):
    """serve.py's output up to its address into lines, then None if it ends before; the rest is
    read and let go, so that it never blocks on a full pipe nor piles up here."""
    found = False
    with stream:
        for line in stream:
            if not found:
                lines.put(line.strip())
                found = bool(ADDRESS.search(line.strip()))
    if not found:
        lines.put(None)


def address(lines, timeout=START_TIMEOUT):
    """serve.py's address from its output within timeout seconds, or BadRequest with its last
    words."""
    deadline, last = time.monotonic() + timeout, ""
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            raise BadRequest(504, f"serve.py did not start in {timeout} s.") from None
        if line is None:
            raise BadRequest(500, f"serve.py stopped: {last or 'no output'}.")
        found = ADDRESS.search(line)
        if found:
            return found[1]
        last = line or last
