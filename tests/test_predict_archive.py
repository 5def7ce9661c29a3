"""predict.py --output: a whole folder or file list into one JSON-lines file, written as it
goes, resumed after kill -9, split across torchrun processes, merged and checked (inference/bulk.py);
and predict.py --plot from the command line."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import PROJECT, link_class_folders, run_command, run_script
from flower_classifier.cli import predict
from flower_classifier.data.folders import iter_images, list_images
from flower_classifier.inference import bulk
from flower_classifier.utils import distributed
from flower_classifier.utils.errors import UserError

CLASSES = ("1", "10", "2")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """36 real photos (symlinks) in class folders, plus one file that is no image."""
    root = link_class_folders(tmp_path_factory.mktemp("archive") / "photos", 12, CLASSES)
    (root / "10" / "broken.jpg").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained[1] / "checkpoint.pth"


@pytest.fixture(scope="module")
def reference(photos, checkpoint, tmp_path_factory):
    """An uninterrupted run's output lines."""
    output = tmp_path_factory.mktemp("reference") / "preds.jsonl"
    result = run_command("predict.py", photos, checkpoint, "--output", output, "--top_k", "2",
                         "--engine", "torch")
    assert result.returncode == 0, result.stderr
    return output.read_text().splitlines()


def predictions(lines):
    """{path: line's object} of an output's lines after the header, each path exactly once."""
    rows = [json.loads(line) for line in lines[1:]]
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths))
    return dict(zip(paths, rows))


def assert_same_predictions(lines, reference_lines):
    """Same header, same images in the same order, same classes, probabilities within 1e-5."""
    assert json.loads(lines[0]) == json.loads(reference_lines[0])
    ours, theirs = predictions(lines), predictions(reference_lines)
    assert list(ours) == list(theirs)
    for path, row in theirs.items():
        assert ours[path].keys() == row.keys()
        if "error" in row:
            assert ours[path] == row
            continue
        assert ours[path]["classes"] == row["classes"] and ours[path]["known"] == row["known"]
        assert ours[path]["probabilities"] == pytest.approx(row["probabilities"], abs=1e-5)


def test_output_has_the_json_lines_of_stdout_and_the_unreadable_file(photos, checkpoint,
                                                                      reference):
    printed = run_command("predict.py", photos, checkpoint, "--json", "--top_k", "2",
                          "--engine", "torch")
    assert printed.returncode == 0, printed.stderr
    header = json.loads(reference[0])
    assert header["input"] == {"folder": str(photos)} and header["engine"] == "torch"
    assert header["model"]["top_k"] == 2 and len(header["model"]["sha256"]) == 64
    rows = predictions(reference)
    assert list(rows) == list_images(photos)  # every image once, in the listing's order
    assert rows[str(photos / "10" / "broken.jpg")] == {
        "path": str(photos / "10" / "broken.jpg"),
        "error": f"cannot identify image file '{photos / '10' / 'broken.jpg'}'"}
    readable = [line for line in reference[1:] if '"error"' not in line]
    assert [json.loads(line) for line in readable] == [
        json.loads(line) for line in printed.stdout.splitlines()]


def wait_for_lines(part_folder, lines, process, timeout=120):
    """Until the parts under part_folder hold `lines` prediction lines in all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = sum(max(0, len(path.read_bytes().splitlines()) - 1)
                   for path in part_folder.glob("*.jsonl"))
        if done >= lines:
            return done
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    raise AssertionError(f"no {lines} lines in {part_folder} after {timeout} s")


def start(*args):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=PROJECT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_kill_9_at_a_random_moment_then_resume_matches_an_uninterrupted_run(
        photos, checkpoint, reference, tmp_path, capsys):
    output = tmp_path / "preds.jsonl"
    moment = random.Random().randint(1, 30)  # lines written before the kill
    run = start("predict.py", photos, checkpoint, "--output", output, "--top_k", "2",
                "--engine", "torch", "--batch_size", "3", "--workers", "0")
    written = wait_for_lines(Path(f"{output}.parts"), moment, run)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not output.exists(), f"killed after {written} lines"
    with pytest.raises(UserError, match="holds an unfinished run; pass --resume"):
        predict.main(parse(photos, checkpoint, "--output", output, "--top_k", "2"))
    capsys.readouterr()
    assert predict.main(parse(photos, checkpoint, "--output", output, "--top_k", "2",
                              "--resume")) == len(reference) - 1
    # Only what was missing was predicted again (the batch under way at most is redone).
    redone = int(capsys.readouterr().err.split("predicting: ")[-1].split("/")[0])
    assert redone <= len(reference) - 1 - written + 3, (written, redone)
    assert_same_predictions(output.read_text().splitlines(), reference)
    assert not Path(f"{output}.parts").exists()
    assert predict.main(parse(photos, checkpoint, "--output", output, "--top_k", "2",
                              "--resume")) == len(reference) - 1  # finished: nothing to do


def test_torchrun_two_processes_resume_a_killed_run_and_match_one(photos, checkpoint,
                                                                   reference, tmp_path):
    """A single process killed midway, finished by two: every image once, same lines."""
    output = tmp_path / "preds.jsonl"
    run = start("predict.py", photos, checkpoint, "--output", output, "--top_k", "2",
                "--engine", "torch", "--batch_size", "4", "--workers", "0")
    wait_for_lines(Path(f"{output}.parts"), 8, run)
    run.send_signal(signal.SIGKILL)
    run.wait()
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "predict.py",
                        photos, checkpoint, "--output", output, "--top_k", "2", "--resume",
                        "--batch_size", "4", "--workers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_predictions(output.read_text().splitlines(), reference)
    assert result.stderr.count(f"{output}: {len(reference) - 1} images") == 1  # rank 0 only


def interrupted_run(args, after_batches=1):
    """predict.main stopped by Ctrl-C after some batches, as a crash leaves its parts."""
    from flower_classifier.inference.predictor import Predictor

    predict_batches = Predictor.predict_batches

    def stopping(*call, **kwargs):
        for number, batch in enumerate(predict_batches(*call, **kwargs)):
            if number == after_batches:
                raise KeyboardInterrupt
            yield batch

    Predictor.predict_batches = stopping
    try:
        with pytest.raises(KeyboardInterrupt):
            predict.main(args)
    finally:
        Predictor.predict_batches = predict_batches


def parse(*args):
    """predict.py's arguments, with --engine torch unless given."""
    engine = [] if "--engine" in args else ["--engine", "torch"]
    return predict.get_args_parser().parse_args([*map(str, args), "--workers", "0",
                                                 "--batch_size", "4", *engine])


def first_part(output):
    """The header line of the first process's part of the first attempt."""
    return (Path(f"{output}.parts") / "attempt-1.rank-0.jsonl").read_text().split("\n")[0]


def write_list(path, paths):
    path.write_text("".join(f"{line}\n" for line in paths))
    return path


def test_resume_refuses_another_checkpoint_or_file_list(photos, checkpoint, tmp_path):
    images = list_images(photos)
    first = write_list(tmp_path / "first.txt", images[:20])
    output = tmp_path / "preds.jsonl"
    interrupted_run(parse(checkpoint, "--file_list", first, "--output", output))
    other = tmp_path / "other.pth"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    torch.save({**state, "epoch": state["epoch"] + 1}, other)
    second = write_list(tmp_path / "second.txt", images[:20])
    reordered = write_list(tmp_path / "first.txt", images[1:21])
    sha256 = json.loads(first_part(output))["model"]["sha256"]
    refused = run_command("predict.py", other, "--file_list", first, "--output", output,
                          "--resume")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr == (f"error: {output}.parts holds predictions of another checkpoint "
                              f"({checkpoint}, sha256 {sha256[:12]}); "
                              "pass that checkpoint, or choose another --output\n")
    for args, message in [
            ((checkpoint, "--file_list", second), "holds predictions of another input"),
            ((checkpoint, "--file_list", first, "--top_k", "3"), "another --top_k"),
            ((checkpoint, "--file_list", first, "--engine", "openvino"), "with engine torch"),
            ((checkpoint, "--file_list", reordered), "does not match the input: image 0")]:
        with pytest.raises(UserError, match=message):
            predict.main(parse(*args, "--output", output, "--resume"))
    write_list(first, images[:20])
    assert predict.main(parse(checkpoint, "--file_list", first, "--output", output,
                              "--resume")) == 20


def test_merge_refuses_a_part_of_another_checkpoint(photos, checkpoint, tmp_path):
    output = tmp_path / "preds.jsonl"
    interrupted_run(parse(photos, checkpoint, "--output", output))
    parts = Path(f"{output}.parts")
    header = json.loads((parts / "run.json").read_text())
    header["model"]["sha256"] = "0" * 64
    (parts / "attempt-1.rank-1.jsonl").write_text(
        json.dumps(header) + "\n" + json.dumps({"index": 30, "path": "x.jpg"}) + "\n")
    with pytest.raises(UserError, match=r"attempt-1.rank-1.jsonl holds predictions of another "
                                        r"checkpoint"):
        predict.main(parse(photos, checkpoint, "--output", output, "--resume"))


def test_file_list_records_missing_files_and_keeps_relative_paths(photos, checkpoint,
                                                                  tmp_path, monkeypatch):
    monkeypatch.chdir(photos)
    paths = ["10/broken.jpg", "1/" + sorted(os.listdir(photos / "1"))[0], "gone.jpg"]
    listing = write_list(tmp_path / "paths.txt", [paths[0], "", paths[1], paths[2]])
    output = tmp_path / "preds.jsonl"
    assert predict.main(parse(checkpoint, "--file_list", listing, "--output", output)) == 3
    lines = output.read_text().splitlines()
    assert json.loads(lines[0])["input"] == {"file_list": str(listing)}
    rows = [json.loads(line) for line in lines[1:]]
    assert [row["path"] for row in rows] == paths
    assert rows[2] == {"path": "gone.jpg", "error": "No such file or directory"}
    assert "cannot identify image file" in rows[0]["error"] and rows[1]["classes"][0] == "1"


@pytest.mark.parametrize("args, message", [
    (["photos", "c.pth", "--resume"], "--resume finishes an --output file"),
    (["c.pth", "--file_list", "list.txt"], "--file_list needs --output"),
    (["photos", "c.pth", "--file_list", "list.txt", "--output", "o"], "pass only the checkpoint"),
    (["photos"], "pass an image or a folder, and a checkpoint"),
    (["c.pth", "--file_list", "missing.txt", "--output", "o"], "file list missing.txt not found"),
])
def test_flags_that_do_not_go_together(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "list.txt").write_text("a.jpg\n")
    with pytest.raises(UserError, match=message):
        predict.check_inputs(predict.get_args_parser().parse_args(args))


def test_listing_streams_in_sorted_path_order(tmp_path):
    """iter_images walks one folder at a time yet gives sorted(full paths): "a-b/" sorts
    before "a/", "a.jpg" before "a/"; a broken symlink is listed, hidden files are not."""
    for name in ["a/x.jpg", "a-b/y.png", "a.jpg", "a/b/z.jpg", "b.txt", "a/.hidden.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "dead.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "loop").symlink_to(tmp_path)  # a folder symlink: not followed
    stream = iter_images(tmp_path)
    assert iter(stream) is stream  # a generator, not a list
    expected = ["a-b/y.png", "a.jpg", "a/b/z.jpg", "a/x.jpg", "dead.jpg"]
    assert list(stream) == [str(tmp_path / name) for name in expected]
    assert list_images(tmp_path) == sorted(list_images(tmp_path))


def test_shard_of_a_stream_takes_every_nth_without_padding(monkeypatch):
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        shares.append(list(distributed.shard(iter(range(10)))))
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert distributed.shard(list(range(10))) == [2, 5, 8]  # a list is sliced as before


def test_part_lines_leave_out_an_incomplete_last_line(photos, checkpoint, tmp_path):
    output = tmp_path / "preds.jsonl"
    interrupted_run(parse(photos, checkpoint, "--output", output), after_batches=2)
    part = Path(f"{output}.parts") / "attempt-1.rank-0.jsonl"
    complete = part.read_text()
    with open(part, "a") as handle:
        handle.write(complete.splitlines()[1][:40])  # a kill -9 in the middle of a write
    source = bulk.Archive(output, photos, "folder", json.loads(complete.split("\n")[0])["model"])
    assert [index for index, _ in bulk.part_lines(source, part, "torch")] == list(range(8))
    assert predict.main(parse(photos, checkpoint, "--output", output, "--resume")) == 37


def test_plot_from_the_command_line(photos, checkpoint, tmp_path):
    """issue 19: predict.py --plot writes the PNG the help promises."""
    image = sorted((photos / "2").iterdir())[0]
    result = run_command("predict.py", image, checkpoint, "--top_k", "3", "--plot",
                         tmp_path / "plot.png")
    assert result.returncode == 0, result.stderr
    assert f"saved {tmp_path / 'plot.png'}" in result.stdout
    with Image.open(tmp_path / "plot.png") as plot:
        assert plot.format == "PNG" and plot.width >= 300 and plot.height >= 300
        colours = plot.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 100  # the photo and the bars, not a blank page


def test_ranks_end_when_torchrun_is_killed(photos, checkpoint, tmp_path):
    """kill -9 of the launcher: its ranks stop too, instead of writing on while a rerun reads."""
    output = tmp_path / "preds.jsonl"
    many = write_list(tmp_path / "many.txt", list_images(photos) * 100)  # minutes of work
    launcher = start("-m", "torch.distributed.run", "--nproc_per_node", "2", "predict.py",
                     "--file_list", many, checkpoint, "--output", output, "--engine", "torch",
                     "--batch_size", "2", "--workers", "0")
    wait_for_lines(Path(f"{output}.parts"), 2, launcher)
    ranks = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)],
                                                capture_output=True, text=True).stdout.split()]
    assert len(ranks) == 2
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 15
    try:
        while any(map(running, ranks)):
            assert time.monotonic() < deadline, "a rank outlived torchrun by 15 s"
            time.sleep(0.2)
    finally:
        for pid in filter(running, ranks):
            os.kill(pid, signal.SIGKILL)


def running(pid):
    """True while the process exists and is no zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
