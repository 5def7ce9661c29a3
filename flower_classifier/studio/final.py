"""The final model: train.py's default run on the studio's folder with its decisions applied
(--corrections, the studio's split manifest), in a process of its own so that the studio stays
responsive; its output is followed line by line for the page and kept in final/train.log.

    final = FinalTraining(studio, torch.device("cpu"))
    final.start()        # {"status": "running", "epoch": None, ...}; 409 while one runs
    final.status()       # epoch, epochs, valid and test accuracy, the last line, the folder
    final.camera_url()   # once done: serve.py's page on it (studio/tryout.py)
    final.stop()         # SIGTERM: train.py stops cleanly, keeping what it saved
"""
import re
import subprocess
import threading
import time

from flower_classifier.data.split import MANIFEST_NAME
from flower_classifier.serve.answers import BadRequest
from flower_classifier.studio.tryout import CameraTryOut
from flower_classifier.utils.errors import error_reason
from flower_classifier.utils.processes import module_command, package_environment, stop_process

FINAL_FOLDER = "final"
LOG_NAME = "train.log"
EPOCH_LINE = re.compile(r"^epoch\s+(\d+)/(\d+).*valid accuracy ([\d.]+)%")
BEST_LINE = re.compile(r"^best epoch (\d+): valid accuracy ([\d.]+)%")
TEST_LINE = re.compile(r"^test accuracy ([\d.]+)%")


def train_command(studio, device, save_dir):
    """python -m flower_classifier.cli.train as a user would run train.py on the folder, with
    the studio's --train_flags."""
    options = studio.options
    command = module_command("flower_classifier.cli.train", options.data_dir, "--save_dir",
                             save_dir, "--corrections", studio.corrections_path, "--arch",
                             options.arch, "--workers", options.workers)
    command += ["--cache_dir", options.cache_dir] if options.cache_dir else ["--no_cache"]
    manifest = studio.save_dir / MANIFEST_NAME  # the studio's split: every placement kept
    if manifest.is_file():
        command += ["--split_from", str(manifest)]
    if options.category_names:
        command += ["--category_names", options.category_names]
    if device.type == "cuda":
        command.append("--gpu")
    return command + list(options.train_flags)


class FinalTraining:
    """At most one train.py process at a time; its state for GET /api/final. config: the
    studio's serve.config.ServeConfig, for the camera try-out (None: none)."""

    def __init__(self, studio, device, config=None):
        self.studio, self.device = studio, device
        self.save_dir = studio.save_dir / FINAL_FOLDER
        self.lock, self.process = threading.Lock(), None
        self.state = {"status": "idle"}
        self.tryout = CameraTryOut(config, device) if config else None

    def start(self):
        with self.lock:
            if self.state["status"] == "running":
                raise BadRequest(409, "The final model is still training; wait for it to end.")
            if self.tryout is not None:
                self.tryout.stop()  # it served the model this run replaces
            log = None
            try:
                self.save_dir.mkdir(parents=True, exist_ok=True)
                log = open(self.save_dir / LOG_NAME, "w", encoding="utf-8")
                self.process = subprocess.Popen(
                    train_command(self.studio, self.device, self.save_dir),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    errors="replace", env=package_environment())
            except OSError as error:
                if log is not None:
                    log.close()
                raise BadRequest(500, f"train.py could not be started in {self.save_dir} "
                                 f"({error_reason(error)}).") from None
            self.state = {"status": "running", "epoch": None, "epochs": None,
                          "valid_accuracy": None, "test_accuracy": None, "line": "",
                          "save_dir": str(self.save_dir), "error": None, "seconds": None}
            threading.Thread(target=self.follow, args=(self.process, log, time.perf_counter()),
                             daemon=True, name="final-model").start()
            return dict(self.state)

    def status(self):
        with self.lock:
            return dict(self.state)

    def follow(self, process, log, started):
        """Read train.py's output to its end (so that it never blocks on a full pipe): each
        line into the log (while the disk takes it) and the state; then its outcome."""
        try:
            with process.stdout, log:
                for line in process.stdout:
                    self.read_line(line.strip())
                    try:
                        log.write(line)
                        log.flush()
                    except OSError:
                        pass  # a full disk loses the log, not the run
        finally:
            self.ended(process.wait(), started)

    def ended(self, code, started):
        with self.lock:
            self.state["seconds"] = round(time.perf_counter() - started, 1)
            if code == 0:
                self.state["status"] = "done"
                self.state["checkpoint"] = str(self.save_dir / "checkpoint.pth")
            else:
                self.state["status"] = "failed"
                self.state["error"] = (self.state["line"] or f"train.py ended with code {code}")

    def read_line(self, line):
        if not line:
            return
        epoch, best, test = EPOCH_LINE.match(line), BEST_LINE.match(line), TEST_LINE.match(line)
        with self.lock:
            self.state["line"] = line
            if epoch:
                self.state.update(epoch=int(epoch[1]), epochs=int(epoch[2]),
                                  valid_accuracy=float(epoch[3]) / 100)
            if best:  # the epoch kept in checkpoint.pth
                self.state.update(best_epoch=int(best[1]), valid_accuracy=float(best[2]) / 100)
            if test:
                self.state["test_accuracy"] = float(test[1]) / 100

    def camera_url(self):
        """The address of serve.py's page on the final model (started on the first call, and
        again for a newer model)."""
        state = self.status()
        if self.tryout is None or state["status"] != "done":
            raise BadRequest(409, "Train the final model first; then try it with the camera.")
        return self.tryout.start(state["checkpoint"])

    def stop(self):
        """Stop a running train.py and the try-out's serve.py for good (SIGTERM: they stop
        cleanly)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # both stop at once; then each is waited for
        if self.tryout is not None:
            self.tryout.stop(close=True)
        stop_process(self.process)
