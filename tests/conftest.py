"""Shared fixtures: small real subsets of ../shared/data/flowers102 and one trained run."""
import contextlib
import importlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
FLOWERS = PROJECT.parent / "shared" / "data" / "flowers102"
CIFAR = PROJECT.parent / "shared" / "data" / "cifar10"
sys.path.insert(0, str(PROJECT))
# One CPU thread per test process (scripts run by the tests inherit it): the tests run two or
# more at a time (pytest.ini), and runs that compare weights need the same threads each time.
os.environ.setdefault("FLOWER_CLASSIFIER_THREADS", "1")
# Feature caches and converted models of runs without --cache_dir go to a folder of this session
# (the test processes and the scripts they run inherit it), not the user's ~/.cache: every run of
# the suite starts from nothing, as in CI.
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="flower-classifier-tests-")
# Scripts the tests interrupt with SIGINT must get it: a suite started in the background by a
# shell that ignores SIGINT there would pass the ignoring on to every script it starts.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
MAX_TEST_PROCESSES = 4  # each holds torch and a model or two: memory, not cores, is the limit


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):  # the controller: the workers are done with it
        shutil.rmtree(os.environ["XDG_CACHE_HOME"], ignore_errors=True)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: the cores, at most MAX_TEST_PROCESSES."""
    return max(1, min(MAX_TEST_PROCESSES, os.cpu_count() or 1))

# Folder names that sort differently as text and as numbers: "1" < "10" < "2".
SUBSET_CLASSES = ("1", "10", "2")
SUBSET_SIZES = {"train": 8, "valid": 3, "test": 3}
# The export tests' subset (test_export.py, test_export_phone.py)
EXPORT_CLASSES = ["1", "10", "11"]          # sorted as names: index order of the checkpoint
EXPORT_SIZES = {"train": 4, "valid": 2, "test": 2}


def require_shared_data(data=FLOWERS):
    """A data set in ../shared/data beside the project: skipped on a machine without it, a
    failure in CI (CI=true), where a skip would hide that the tests did not run."""
    if data.is_dir():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{data} is missing: CI needs ../shared beside the project")
    pytest.skip(f"{data} is missing")


def make_subset(root, classes=SUBSET_CLASSES, sizes=SUBSET_SIZES, data=FLOWERS):
    """Symlinks to the first images of a few classes of data: real photos, nothing copied."""
    for split, count in sizes.items():
        link_class_folders(Path(root) / split, count, classes, data / split)
    return Path(root)


def link_class_folders(root, count, classes=SUBSET_CLASSES, source=FLOWERS / "train"):
    """root/<class>/ for each class, holding symlinks to the first `count` photos of that
    class in source: one folder of class folders of real photos, nothing copied."""
    require_shared_data(source.parent)
    for name in classes:
        folder = Path(root) / name
        folder.mkdir(parents=True)
        for image in sorted((source / name).iterdir())[:count]:
            (folder / image.name).symlink_to(image)
    return Path(root)


def run_script(*args, timeout=300, **kwargs):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=PROJECT, capture_output=True,
                          text=True, timeout=timeout, env=env, **kwargs)


def run_command(command, *args, cwd=PROJECT):
    """Run a command (its script's name, or a benchmark's module) in this process as its script
    runs it (run_cli: the one-line errors, the exit codes), without a new Python importing torch
    again; returns what run_script returns. Signals, kills, servers and torchrun need
    run_script's real process."""
    from flower_classifier.cli.runner import run_cli

    if isinstance(command, str):
        command = importlib.import_module(f"flower_classifier.cli.{Path(command).stem}")
    script = Path(command.__file__).name
    parser = command.get_args_parser()
    parser.prog = script
    argv = list(map(str, args))
    stdout, stderr = io.StringIO(), io.StringIO()
    sigterm, folder = signal.getsignal(signal.SIGTERM), os.getcwd()
    os.chdir(cwd)  # not contextlib.chdir: Python 3.10 lacks it
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            run_cli(command.main, parser, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        os.chdir(folder)
        signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess([script, *argv], code, stdout.getvalue(),
                                       stderr.getvalue())


# Flags for train.py on the tests' small subsets (a batch or two of photos): one pass over
# them per epoch, as train.py does with a large folder. The default --min_epoch_steps passes a
# small one many times; test_train_predict tests those passes, and the tests that run the
# default without these flags.
ONE_PASS = ("--min_epoch_steps", "0")


def train_args(data, save_dir, cache_dir, *extra):
    import train

    return train.get_args_parser().parse_args(
        [str(data), "--save_dir", str(save_dir), "--cache_dir", str(cache_dir), "--workers", "0",
         *ONE_PASS, *map(str, extra)])


@pytest.fixture(scope="session")
def subset(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp("flowers") / "data")


@pytest.fixture(scope="session")
def export_data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp("export") / "data", EXPORT_CLASSES, EXPORT_SIZES)


@pytest.fixture(scope="session")
def export_checkpoint(export_data, tmp_path_factory):
    """A real checkpoint from train.py on export_data (2 epochs), for both export test files;
    it has the unknown verdict, the mirror average and a temperature."""
    import train

    root = tmp_path_factory.mktemp("export_run")
    train.main(train_args(export_data, root / "run", root / "cache", "--epochs", "2"))
    return root / "run" / "checkpoint.pth"


@pytest.fixture(scope="session")
def trained(subset, tmp_path_factory):
    """One real training run on the subset: (result dict, save_dir)."""
    import train

    root = tmp_path_factory.mktemp("trained")
    result = train.main(train_args(subset, root / "run", root / "cache", "--epochs", "8"))
    return result, root / "run"


@contextlib.contextmanager
def stopped_at_epoch(epoch, error=KeyboardInterrupt):
    """The Trainer raising `error` (Ctrl-C by default) as epoch `epoch` begins; the block must
    end with it."""
    from flower_classifier.training import loop

    run_epoch = loop.Trainer.run_epoch

    def run_or_stop(self, number):
        if number == epoch:
            raise error
        return run_epoch(self, number)

    loop.Trainer.run_epoch = run_or_stop
    try:
        with pytest.raises(error if isinstance(error, type) else type(error)):
            yield
    finally:
        loop.Trainer.run_epoch = run_epoch
