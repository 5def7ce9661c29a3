"""Faults beyond bad flags: a new run where an old one lies, an unwritable feature cache,
unreadable valid/ or test/ images, --resume with other flags, write and memory errors, a
command outliving the studio that started it."""
import argparse
import errno
import http.client
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import PROJECT, make_subset, train_args
from flower_classifier.cli.runner import run_cli
from flower_classifier.data import download
from flower_classifier.models.checkpoint import load_checkpoint, save_checkpoint
from flower_classifier.training import loop
from flower_classifier.utils.errors import UserError
from flower_classifier.utils.files import atomic_write


def test_new_run_keeps_the_earlier_runs_files(subset, tmp_path):
    run = tmp_path / "run"
    train.main(train_args(subset, run, tmp_path / "cache", "--epochs", "2", "--no_data_check"))
    earlier = {path.name: path.read_bytes() for path in run.iterdir()}
    # the mistakes only where a test photo was named wrongly
    mistakes = {"mistakes.png", "mistakes.html"}
    assert set(loop.RUN_FILES) - mistakes <= set(earlier) <= set(loop.RUN_FILES)
    with pytest.raises(UserError):  # fails before its first save: nothing is moved
        train.main(train_args(tmp_path / "no_data", run, tmp_path / "cache"))
    assert {path.name: path.read_bytes() for path in run.iterdir()} == earlier
    train.main(train_args(subset, run, tmp_path / "cache", "--epochs", "1", "--seed", "1",
                          "--no_data_check"))
    for name, content in earlier.items():
        stem, suffix = name.split(".")
        assert (run / f"{stem}.previous.{suffix}").read_bytes() == content
    assert load_checkpoint(run / "checkpoint.pth")["hyperparameters"]["seed"] == 1
    # One generation is kept: a third run's *.previous.* are the second run's files.
    second = {path.name: path.read_bytes() for path in run.iterdir() if ".previous" not in path.name}
    train.main(train_args(subset, run, tmp_path / "cache", "--epochs", "1", "--seed", "2",
                          "--no_data_check"))
    for name, content in second.items():
        stem, suffix = name.split(".")
        assert (run / f"{stem}.previous.{suffix}").read_bytes() == content
    third = {path.name for path in run.iterdir() if ".previous" not in path.name}
    assert {path.name for path in run.iterdir()} == third | {
        name.replace(".", ".previous.") for name in second}
    with pytest.raises(UserError, match="move it and train_state.previous.pth"):
        train.main(train_args(subset, run, tmp_path / "cache", "--resume",
                              run / "checkpoint.previous.pth"))


def test_unwritable_feature_cache_warns_once_and_trains(subset, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    result = train.main(train_args(subset, tmp_path / "run", tmp_path / "a_file" / "cache",
                                   "--epochs", "1"))
    assert capsys.readouterr().err.count("feature cache not saved") == 1
    assert result["extracted_images"] == sum(1 for _ in subset.glob("*/*/*"))
    assert (tmp_path / "run" / "checkpoint.pth").is_file()


def make_unreadable(folder):
    """Replace each image symlink below folder by an empty file (the shared data is untouched)."""
    for image in folder.glob("*/*"):
        image.unlink()
        image.write_bytes(b"")


def test_unreadable_test_images_skip_the_report_and_unreadable_valid_stops(tmp_path, capsys):
    data = make_subset(tmp_path / "data", sizes={"train": 3, "valid": 1, "test": 1})
    make_unreadable(data / "test")
    result = train.main(train_args(data, tmp_path / "run", tmp_path / "cache", "--epochs", "1"))
    assert result["test_accuracy"] is None
    assert "no readable images in test/" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint.pth").is_file()
    assert not (tmp_path / "run" / "test_report.json").exists()
    make_unreadable(data / "valid")
    with pytest.raises(UserError, match="no readable images in valid/"):
        train.main(train_args(data, tmp_path / "run2", tmp_path / "cache", "--epochs", "1"))


def test_resume_says_which_typed_flags_it_does_not_follow(subset, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(train_args(subset, run, tmp_path / "cache", "--epochs", "2"))
    state = load_checkpoint(run / "train_state.pth")
    save_checkpoint({**state, "epoch_done": 1, "history": state["history"][:1]},
                    run / "train_state.pth")  # as if cut after epoch 1
    capsys.readouterr()
    result = train.main(train_args(subset, run, tmp_path / "cache", "--resume", run,
                                   "--learning_rate", "0.5"))
    warnings = capsys.readouterr().err
    assert "--learning_rate 0.001, not 0.5" in warnings and "--epochs" not in warnings
    assert [record["epoch"] for record in result["history"]] == [1, 2]


def test_finetune_skips_unreadable_images_with_a_warning_or_stops_with_strict(tmp_path, capsys):
    data = make_subset(tmp_path / "data", classes=("1", "2"), sizes={"train": 2, "valid": 1})
    (data / "train" / "1" / "zero.jpg").write_bytes(b"")
    flags = ("--finetune", "--finetune_layers", "1", "--epochs", "1", "--batch_size", "8")
    with pytest.raises(UserError, match="1 unreadable images .*zero.jpg"):
        train.main(train_args(data, tmp_path / "strict", tmp_path / "cache", *flags, "--strict"))
    capsys.readouterr()
    train.main(train_args(data, tmp_path / "run", tmp_path / "cache", *flags))
    assert "skipped 1 unreadable images in train/" in capsys.readouterr().err


@pytest.mark.parametrize("code, fix", [
    (errno.ENOSPC, "free some disk space"),
    (errno.EACCES, "choose a folder you can write to"),
])
def test_write_errors_name_their_fix_and_leave_no_file(tmp_path, code, fix):
    def failing(temporary):
        temporary.write_bytes(b"half")
        raise OSError(code, "reason from the system")

    with pytest.raises(UserError, match=rf"\(reason from the system\); {fix}$"):
        atomic_write(tmp_path / "checkpoint.pth", failing)
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_the_folder_should_be_names_the_fix(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"a_file/plot.png \(.*\); choose a folder you can write to$"):
        atomic_write(tmp_path / "a_file" / "plot.png", lambda temporary: temporary.write_text(""))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file"]


def test_out_of_gpu_memory_is_one_line(capsys):
    def main(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, argparse.ArgumentParser(), [])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: out of GPU memory (CUDA out of memory. Tried to "
                                       "allocate 2.00 GiB); lower --batch_size, or run without "
                                       "--gpu\n")


def test_connection_lost_mid_download_is_a_network_error():
    class DroppedResponse:
        def read(self, size):
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    with pytest.raises(http.client.HTTPException, match="connection broke off"):
        list(download.read_chunks(DroppedResponse()))


# A command as the studio starts one (package_environment), which starts nothing itself: its
# main only waits. The parent prints the command's pid, then waits for it.
COMMAND = ("import argparse, time; from flower_classifier.cli.runner import run_cli; "
           "run_cli(lambda args: time.sleep(120), argparse.ArgumentParser())")
PARENT = ("import subprocess, sys; from flower_classifier.utils import processes; "
          "processes.PARENT_POLL = 0.05; "
          f"child = subprocess.Popen([sys.executable, '-c', {COMMAND!r}], "
          "env=processes.package_environment()); print(child.pid, flush=True); child.wait()")


def running(pid):
    """Whether pid is a process that has not ended (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_command_the_studio_started_stops_when_the_studio_is_killed(tmp_path):
    """train.py and serve.py started by the studio end cleanly (SIGTERM) when it dies, even by
    kill -9, instead of training or serving on unseen."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=PROJECT, text=True,
                              stdout=subprocess.PIPE)
    child = int(parent.stdout.readline())
    time.sleep(0.5)
    assert running(child)  # the parent is there: it goes on
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    parent.stdout.close()
    deadline = time.monotonic() + 30
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child)
