"""Trying the final model with a phone's camera: serve.py on its checkpoint, in a process of its
own, bound as the studio is (its host, token and origins) on a free port; the page links to
serve.py's page, which takes photos from the camera.

    tryout = CameraTryOut(config)            # the studio's serve.config.ServeConfig
    tryout.start("studio/final/checkpoint.pth")  # "http://192.168.1.5:41234/#token=..."
    tryout.stop()
"""
import queue
import re
import subprocess
import threading
from pathlib import Path

from flower_classifier.serve.answers import BadRequest
from flower_classifier.utils.processes import module_command, package_environment, stop_process

ADDRESS = re.compile(r" at (http://\S+)")  # serve_until_stopped's line
START_TIMEOUT = 180  # seconds serve.py gets to load the model and say where it is


def serve_command(config, checkpoint):
    """python -m flower_classifier.cli.serve as a user would run serve.py on the checkpoint."""
    command = module_command("flower_classifier.cli.serve", checkpoint, "--host", config.host,
                             "--port", 0)
    if config.token:
        command += ["--token", config.token]
    for origin in config.allowed_origins:
        command += ["--allow_origin", origin]
    return command


class CameraTryOut:
    """At most one serve.py at a time, on the checkpoint asked for last."""

    def __init__(self, config):
        self.config, self.lock = config, threading.Lock()
        self.process = self.url = self.serving = None

    def start(self, checkpoint):
        """serve.py's address once it serves checkpoint (the running one when it serves that
        file as it is now); a sentence as BadRequest when it cannot start."""
        checkpoint = Path(checkpoint)
        try:
            serving = (str(checkpoint.resolve()), checkpoint.stat().st_mtime_ns)
        except OSError:
            raise BadRequest(409, "There is no final model yet; train it first.") from None
        with self.lock:
            if self.serving == serving and self.process.poll() is None:
                return self.url
            self.stop_locked()
            lines = queue.Queue()
            self.process = subprocess.Popen(
                serve_command(self.config, checkpoint), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, errors="replace",
                env=package_environment())
            threading.Thread(target=drain, args=(self.process.stdout, lines), daemon=True,
                             name="camera-try-out").start()
            self.url = address(lines)
            self.serving = serving
            return self.url

    def stop(self):
        with self.lock:
            self.stop_locked()

    def stop_locked(self):
        stop_process(self.process)
        self.process = self.serving = None


def drain(stream, lines):
    """Every line of serve.py's output into lines (so that it never blocks on a full pipe),
    then None at its end."""
    with stream:
        for line in stream:
            lines.put(line.strip())
    lines.put(None)


def address(lines):
    """serve.py's address from its output, or BadRequest with its last words."""
    last = ""
    while True:
        try:
            line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            raise BadRequest(504, f"serve.py did not start in {START_TIMEOUT} s.") from None
        if line is None:
            raise BadRequest(500, f"serve.py stopped: {last or 'no output'}.")
        found = ADDRESS.search(line)
        if found:
            return found[1]
        last = line or last
