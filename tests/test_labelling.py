"""Labelling new photos with the model's help: predict.py --sort_into (pre-labelled folders
and a manifest, resumable; inference/sort_into.py) and --suggest (the photos worth labelling,
uncertain and diverse; inference/suggest.py), on real photos from the trained fixture's
checkpoint, with an unreadable file and a non-flower among them."""
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import FLOWERS, link_class_folders, run_command
from flower_classifier.cli import predict
from flower_classifier.inference import sort_into as sorting
from flower_classifier.inference.predictor import Predictor
from flower_classifier.inference.suggest import (
    Tally,
    candidate_pool,
    certainties,
    diverse,
    suggest_photos,
)
from flower_classifier.utils.errors import UserError

CLASSES = ("1", "10", "2")
NOT_FLOWERS = FLOWERS.parent / "not_flowers"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Unlabelled photos: 3 valid photos of each of the 3 classes in one flat folder, one in a
    sub-folder under the same name as a flat one, a non-flower, and a text file named .jpg."""
    root = tmp_path_factory.mktemp("unlabelled") / "photos"
    classes = link_class_folders(tmp_path_factory.mktemp("valid") / "classes", 3, CLASSES,
                                 FLOWERS / "valid")
    root.mkdir()
    for image in sorted(classes.rglob("*.jpg")):
        (root / f"{image.parent.name}-{image.name}").symlink_to(image.resolve())
    (root / "more").mkdir()
    first = sorted(root.iterdir())[0]
    (root / "more" / first.name).symlink_to(first.resolve())
    (root / f"more__{first.name}").symlink_to(first.resolve())  # more/'s name, flattened
    (root / "zz-not-a-flower.jpg").symlink_to(sorted((NOT_FLOWERS / "tench").iterdir())[0])
    (root / "broken.jpg").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained[1] / "checkpoint.pth"


def parse(*args):
    return predict.get_args_parser().parse_args([*map(str, args), "--workers", "0",
                                                 "--batch_size", "4", "--engine", "torch"])


def manifest_rows(review):
    lines = (review / sorting.MANIFEST).read_text().splitlines()
    assert json.loads(lines[0])["format"] == "predict.py archive 1"
    return [json.loads(line) for line in lines[1:]]


def originals(folder):
    """What must never change: each entry's link target or bytes, and its stamps."""
    return {path: (os.readlink(path) if path.is_symlink() else path.read_bytes(),
                   os.lstat(path).st_mtime_ns) for path in sorted(folder.rglob("*"))
            if not path.is_dir()}


@pytest.fixture(scope="module")
def sorted_run(photos, checkpoint, tmp_path_factory):
    review = tmp_path_factory.mktemp("sorted") / "review"
    before = originals(photos)
    counts = predict.main(parse(photos, checkpoint, "--sort_into", review))
    assert originals(photos) == before
    return review, counts


def test_sort_into_links_every_photo_once_into_its_predicted_class_folder(photos, sorted_run):
    review, counts = sorted_run
    rows = manifest_rows(review)
    listed = sorted(str(path) for path in photos.rglob("*.jpg"))
    assert [row["path"] for row in rows] == listed  # each photo once, in input order
    broken = next(row for row in rows if row["path"].endswith("broken.jpg"))
    assert set(broken) == {"path", "error"} and "cannot identify image" in broken["error"]
    for row in rows:
        if "error" in row:
            continue
        folder = "unknown" if row["known"] is False else row["names"][0]
        assert row["file"].startswith(folder + "/") and row["placed"] == "symlink"
        assert len(row["probabilities"]) == 2  # at least 2, for the margin
        assert row["probability"] == row["probabilities"][0]
        assert row["margin"] == pytest.approx(row["probabilities"][0] - row["probabilities"][1])
        assert (review / row["file"]).read_bytes() == Path(row["path"]).read_bytes()
    files = [row["file"] for row in rows if "file" in row]
    assert len(files) == len(set(files)) == len(listed) - 1  # the flat name clash got ~index
    assert sorted(str(path.relative_to(review)) for path in review.rglob("*.jpg")) == \
        sorted(files)
    assert counts[""] == 1 and sum(counts.values()) == len(listed)


def test_sort_into_resumed_after_it_finished_checks_and_changes_nothing(photos, checkpoint,
                                                                       sorted_run):
    review, counts = sorted_run
    manifest = (review / sorting.MANIFEST).read_text()
    assert predict.main(parse(photos, checkpoint, "--sort_into", review, "--resume")) == counts
    assert (review / sorting.MANIFEST).read_text() == manifest
    with pytest.raises(UserError, match="another --top_k"):
        predict.main(parse(photos, checkpoint, "--sort_into", review, "--resume",
                           "--top_k", "3"))


def test_sort_into_refuses_a_folder_that_holds_other_files(photos, checkpoint, sorted_run,
                                                           tmp_path):
    review, _ = sorted_run
    result = run_command("predict.py", photos, checkpoint, "--sort_into", review)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: --sort_into {review} already holds files; pass --resume "
                             "to continue the run begun there, or choose an empty folder\n")
    (tmp_path / "notes.txt").write_text("mine")
    for args, message in [((tmp_path, "--resume"), "no --sort_into run to resume"),
                          ((photos / "review",), "is inside the input"),
                          ((tmp_path / "notes.txt",), "is a file")]:
        with pytest.raises(UserError, match=message):
            predict.main(parse(photos, checkpoint, "--sort_into", *args))


def stop_after(monkeypatch, module, name, calls):
    """module.name raising Ctrl-C on its call number `calls` (from 0), as a crash would."""
    original, count = getattr(module, name), [0]

    def stopping(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, stopping)


@pytest.mark.parametrize("stop", ["predicting", "linking"])
def test_an_interrupted_sort_into_resumes_to_the_same_folders(photos, checkpoint, sorted_run,
                                                              tmp_path, monkeypatch, stop):
    review = tmp_path / "review"
    with monkeypatch.context() as patch:
        if stop == "predicting":  # after one batch of 4 is written
            stop_after(patch, Predictor, "outputs_and_features", 1)
        else:  # after 3 photos are linked
            stop_after(patch, sorting, "place", 3)
        with pytest.raises(KeyboardInterrupt):
            predict.main(parse(photos, checkpoint, "--sort_into", review))
    assert not (review / sorting.MANIFEST).exists()
    with pytest.raises(UserError, match="already holds files; pass --resume"):
        predict.main(parse(photos, checkpoint, "--sort_into", review))
    predict.main(parse(photos, checkpoint, "--sort_into", review, "--resume"))
    reference = manifest_rows(sorted_run[0])
    rows = manifest_rows(review)
    assert [(row["path"], row.get("file")) for row in rows] == \
        [(row["path"], row.get("file")) for row in reference]
    assert sorted(path.relative_to(review) for path in review.rglob("*.jpg")) == \
        sorted(path.relative_to(sorted_run[0]) for path in sorted_run[0].rglob("*.jpg"))
    assert not (review / sorting.PREDICTIONS).exists()


def test_links_fall_back_to_a_hard_link_then_a_copy(photos, tmp_path, monkeypatch):
    original = photos / "broken.jpg"  # a plain file: a hard link to a symlink would dangle
    before = originals(photos)

    def refused(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", refused)
    assert sorting.place(original, photos, tmp_path / "a", 0) == ("a/broken.jpg", "hardlink")
    monkeypatch.setattr(os, "link", refused)
    assert sorting.place(original, photos, tmp_path / "b", 0) == ("b/broken.jpg", "copy")
    assert (tmp_path / "b" / "broken.jpg").read_bytes() == original.read_bytes()
    assert sorting.place(original, photos, tmp_path / "b", 0) == ("b/broken.jpg", "copy")
    assert originals(photos) == before


def test_folder_names_are_never_paths_or_hidden():
    assert sorting.folder_name("a/b") == "a-b"
    assert sorting.folder_name("..") == "_" and sorting.folder_name(".x") == "x"


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor(checkpoint, engine="torch")


def all_certainties(predictor, paths, by):
    """{path: certainty} of every readable, known photo, the slow way: all at once."""
    found = {}
    for batch, errors, outputs in predictor.output_batches(enumerate(paths), 64, 0):
        readable = [path for (_, path), error in zip(batch, errors) if error is None]
        probabilities, known, _ = outputs
        for path, score, verdict in zip(readable, certainties(probabilities, by).tolist(),
                                        known.tolist()):
            if verdict:
                found[path] = score
    return found


@pytest.mark.parametrize("by", ["margin", "entropy"])
def test_the_streamed_pool_keeps_exactly_the_least_sure_photos(predictor, photos, by):
    paths = sorted(str(path) for path in photos.rglob("*.jpg"))
    scores = all_certainties(predictor, paths, by)
    tally = Tally()
    pool = candidate_pool(predictor, iter(paths), 4, by, 3, 0, tally)
    assert [entry[2] for entry in pool] == sorted(scores, key=lambda p: (scores[p], p))[:4]
    assert [entry[0] for entry in pool] == pytest.approx(sorted(scores.values())[:4], abs=1e-6)
    assert tally.photos == len(paths) and tally.unreadable == 1
    assert tally.unknown == len(paths) - 1 - len(scores)


def test_suggest_never_picks_two_near_copies_and_groups_by_class(predictor, photos, tmp_path):
    paths = sorted(str(path) for path in photos.rglob("*.jpg"))
    scores = all_certainties(predictor, paths, "margin")
    least_sure = min(scores, key=scores.get)
    folder = tmp_path / "photos"
    folder.mkdir()
    for number, path in enumerate(paths):
        (folder / f"{number:02d}-{Path(path).name}").symlink_to(Path(path).resolve())
    for copy in range(20):  # 20 copies of the most confusing photo
        (folder / f"copy-{copy:02d}.jpg").symlink_to(Path(least_sure).resolve())
    suggestions = suggest_photos(predictor, folder, 5, batch_size=4, workers=0)
    chosen = [Path(s.path).resolve() for s in suggestions]
    assert chosen.count(Path(least_sure).resolve()) == 1 and len(suggestions) == 5
    groups = [s.group for s in suggestions]
    assert groups == sorted(groups, key=groups.index)  # each class's photos together
    for group in set(groups):
        members = [s.certainty for s in suggestions if s.group == group]
        assert members == sorted(members)
    record = suggestions[0].as_json()
    assert set(record) == {"path", "predicted", "name", "certainty", "group", "classes",
                           "names", "probabilities"}
    assert record["name"] == record["names"][0] == record["group"]
    # without diversity (no cosine is above 2) the copies crowd the list
    plain = suggest_photos(predictor, folder, 5, max_similarity=2, batch_size=4, workers=0)
    assert [Path(s.path).resolve() for s in plain].count(Path(least_sure).resolve()) > 1


def test_suggest_from_the_command_line(photos, checkpoint, tmp_path):
    result = run_command("predict.py", photos, checkpoint, "--suggest", "3", "--workers", "0")
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(lines) == 3 and all(len(line) == 3 for line in lines)
    assert all(Path(path).is_relative_to(photos) for path, _, _ in lines)
    assert f"3 of {len(list(photos.rglob('*.jpg')))} photos suggested (margin; " in result.stderr
    assert "and 1 unreadable left out)" in result.stderr
    output = tmp_path / "suggested.jsonl"
    suggestions = predict.main(parse(photos, checkpoint, "--suggest", "3", "--output", output,
                                     "--suggest_by", "entropy"))
    assert [json.loads(line) for line in output.read_text().splitlines()] == \
        [s.as_json() for s in suggestions]


@pytest.mark.parametrize("args, message", [
    (["--suggest", "3", "--sort_into", "r"], "two runs; pass one of them"),
    (["--sort_into", "r", "--output", "o.jsonl"], "--sort_into does not go with --output"),
    (["--suggest", "3", "--resume"], "--suggest does not go with --resume"),
    (["--suggest", "3", "--report", "r"], "--suggest does not go with --report"),
])
def test_labelling_flags_that_do_not_go_together(photos, args, message):
    parsed = predict.get_args_parser().parse_args([str(photos), "c.pth", *args])
    with pytest.raises(UserError, match=message):
        predict.check_modes(parsed, photos)


@pytest.mark.parametrize("mode", [["--suggest", "3"], ["--sort_into", "r"]])
def test_labelling_takes_a_folder(photos, mode):
    parsed = predict.get_args_parser().parse_args([str(photos), "c.pth", *mode])
    with pytest.raises(UserError, match=f"{mode[0]} takes a folder of photos"):
        predict.check_modes(parsed, photos / "broken.jpg")


def test_certainty_is_zero_for_a_tie_and_one_for_a_sure_answer():
    probabilities = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert certainties(probabilities, "margin").tolist() == [0.0, 1.0]
    assert certainties(probabilities, "entropy")[1] == pytest.approx(1.0)
    assert 0 < certainties(probabilities, "entropy")[0] < 1


def made_up_pool(classes, features):
    """Pool entries, least sure first, predicted as classes (of 3), with these features."""
    return [(0.1 * index, index, f"{index}.jpg", torch.eye(3)[label], feature)
            for index, (label, feature) in enumerate(zip(classes, features))]


def test_the_class_spread_takes_a_few_per_class_first_then_the_least_sure_of_the_rest():
    pool = made_up_pool([0, 0, 0, 0, 1, 1, 2], torch.eye(7))
    chosen = [entry[1] for entry in diverse(pool, 4, 0.95, per_class=2)]
    assert chosen == [0, 1, 4, 5]  # class 0's third and fourth wait for class 1
    assert [entry[1] for entry in diverse(pool, 6, 0.95, per_class=1)] == [0, 4, 6, 1, 2, 3]
    assert [entry[1] for entry in diverse(pool, 4, 0.95)] == [0, 1, 2, 3]
    copies = made_up_pool([0, 0, 0, 1], torch.eye(4)[[0, 0, 1, 2]])  # 1 is a copy of 0
    assert [entry[1] for entry in diverse(copies, 4, 0.95, per_class=1)] == [0, 3, 2]
