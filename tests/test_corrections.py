"""corrections.json, the studio's decisions as train.py and check_data.py apply them: loaded,
recorded at once and merged across writers, and applied in the split each photo is in."""
import json
import multiprocessing
import threading

import pytest
from conftest import FLOWERS, link_class_folders, run_command, train_args

from flower_classifier.data.corrections import (
    FORGET,
    apply_corrections,
    corrections_line,
    load_corrections,
    photo_key,
    photo_keys,
    record_decisions,
)
from flower_classifier.data.split import load_dataset
from flower_classifier.training.config import TrainConfig
from flower_classifier.training.run import load_run_dataset
from flower_classifier.utils.errors import UserError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One folder of 3 class folders of 10 real photos each (symlinks)."""
    return link_class_folders(tmp_path_factory.mktemp("corrections") / "photos", 10)


def test_a_missing_file_is_no_decision_and_a_damaged_one_names_itself(tmp_path):
    assert load_corrections(tmp_path / "corrections.json") == {}
    damaged = tmp_path / "damaged.json"
    damaged.write_text('{"format": 1, "decisions": {')
    with pytest.raises(UserError, match="not valid JSON"):
        load_corrections(damaged)
    damaged.write_text(json.dumps({"format": 1, "decisions": {"/a.jpg": {"at": "x"}}}))
    with pytest.raises(UserError, match="is not a corrections file"):
        load_corrections(damaged)


def test_each_decision_is_written_at_once_in_the_contracts_format(tmp_path):
    path = tmp_path / "studio" / "corrections.json"
    record_decisions(path, {tmp_path / "a.jpg": None})
    record_decisions(path, {tmp_path / "b.jpg": "2"})
    data = json.loads(path.read_text())
    assert data["format"] == 1
    assert {key: entry["label"] for key, entry in data["decisions"].items()} == {
        str((tmp_path / "a.jpg").resolve()): None, str((tmp_path / "b.jpg").resolve()): "2"}
    assert all(entry["at"].startswith("20") for entry in data["decisions"].values())
    record_decisions(path, {tmp_path / "a.jpg": FORGET})
    assert list(load_corrections(path)) == [str((tmp_path / "b.jpg").resolve())]
    assert not list(path.parent.glob(".*.tmp"))


def test_threads_deciding_about_different_photos_all_keep_their_decisions(tmp_path):
    path = tmp_path / "corrections.json"
    threads = [threading.Thread(target=record_decisions, args=(path, {tmp_path / f"{i}.jpg": "1"}))
               for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(load_corrections(path)) == 20


def _record_many(path, prefix):
    for index in range(15):
        record_decisions(path, {f"/photos/{prefix}{index}.jpg": None})


def test_processes_deciding_about_different_photos_all_keep_their_decisions(tmp_path):
    path = tmp_path / "corrections.json"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_record_many, args=(path, prefix)) for prefix in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(load_corrections(path)) == 30


def test_apply_drops_and_relabels_in_the_split_each_photo_is_in(folder, tmp_path):
    dataset = load_dataset(folder)
    train, valid = dataset.splits["train"], dataset.splits["valid"]
    dropped, relabelled, confirmed = train.paths[0], valid.paths[0], train.paths[1]
    new_class = next(name for name, index in dataset.class_to_idx.items()
                     if index != valid.labels[0])
    path = tmp_path / "corrections.json"
    record_decisions(path, {dropped: None, relabelled: new_class,
                            confirmed: list(dataset.class_to_idx)[train.labels[1]],
                            "/elsewhere/photo.jpg": None})
    counts = {}
    corrected = apply_corrections(dataset, load_corrections(path), counts)
    assert counts == {"dropped": 1, "relabelled": 1, "kept": 1, "added": 0, "unmatched": 1}
    assert dropped not in corrected.splits["train"].paths
    assert len(corrected.splits["train"].paths) == len(train.paths) - 1
    assert corrected.splits["valid"].paths == valid.paths
    assert corrected.splits["valid"].labels[0] == dataset.class_to_idx[new_class]
    assert corrected.splits["valid"].labels[1:] == valid.labels[1:]
    assert corrected.manifest is dataset.manifest  # every placement kept
    assert dataset.splits["train"].paths[0] == dropped  # the original is unchanged
    assert (folder / "1").is_dir() and len(list((folder / "1").iterdir())) == 10  # no file moved


def test_a_new_photo_labelled_in_the_studio_joins_its_split_and_nothing_moves(folder, tmp_path):
    """Decisions with a split add photos from outside the folder (the studio's new photos):
    with a label to that split, with null nowhere; a vanished one is left out."""
    new = link_class_folders(tmp_path / "new", 3, ("1",), FLOWERS / "valid") / "1"
    added, skipped = sorted(new.iterdir())[:2]
    path = tmp_path / "corrections.json"
    record_decisions(path, {added: "1", skipped: None, tmp_path / "gone.jpg": "1"},
                     added_to={added: "train", skipped: "train", tmp_path / "gone.jpg": "train"})
    assert load_corrections(path)[photo_key(added)]["split"] == "train"
    dataset = load_dataset(folder)
    counts = {}
    corrected = apply_corrections(dataset, load_corrections(path), counts)
    assert counts == {"dropped": 0, "relabelled": 0, "kept": 0, "added": 1, "unmatched": 1}
    train = corrected.splits["train"]
    assert train.paths[:-1] == dataset.splits["train"].paths
    assert train.paths[-1] == photo_key(added)  # a str, as the folder's paths are
    assert train.labels[-1] == dataset.class_to_idx["1"]
    assert len(dataset.splits["train"].paths) == len(train.paths) - 1  # the original unchanged
    assert corrections_line(path, counts).endswith("0 confirmed, 1 added; 1 decision(s) name "
                                                   "photos not in the data folder")
    assert sorted(new.iterdir()) == sorted([added, skipped, *sorted(new.iterdir())[2:]])


def test_train_py_learns_from_added_photos_and_caches_their_features(folder, tmp_path):
    new = link_class_folders(tmp_path / "new", 2, ("2",), FLOWERS / "valid") / "2"
    path = tmp_path / "corrections.json"
    record_decisions(path, {photo: "2" for photo in new.iterdir()},
                     added_to={photo: "train" for photo in new.iterdir()})
    args = ("train.py", folder, "--save_dir", tmp_path / "run", "--cache_dir", tmp_path / "cache",
            "--corrections", path, "--train_stages", "0", "--epochs", "1", "--workers", "0")
    first, second = run_command(*args), run_command(*args)
    assert first.returncode == 0, first.stderr
    assert "0 confirmed, 2 added" in first.stdout
    assert "features ready: 32 images through the backbone, none from the cache" in first.stdout
    assert "features ready: 0 images through the backbone, all 32 from the cache" in (
        second.stdout), second.stdout + second.stderr
    augmented = run_command(*args, "--augment", "1")  # a view's seed from a path outside
    assert augmented.returncode == 0, augmented.stderr


def test_a_class_the_folder_lacks_is_a_user_error(folder, tmp_path):
    dataset = load_dataset(folder)
    with pytest.raises(UserError, match="'nope'"):
        apply_corrections(dataset, {photo_key(dataset.splits["train"].paths[0]):
                                    {"label": "nope", "at": ""}})


def test_train_and_check_data_take_corrections(folder, tmp_path):
    import check_data

    path = tmp_path / "corrections.json"
    first = sorted((folder / "1").iterdir())[0]
    record_decisions(path, {first: None})
    args = train_args(folder, tmp_path / "run", tmp_path / "cache", "--corrections", path)
    assert args.corrections == str(path)
    config = TrainConfig(str(folder), corrections=str(path), save_dir=str(tmp_path / "run"))
    dataset = load_run_dataset(config, tmp_path / "run")
    every = [p for split in dataset.splits.values() for p in split.paths]
    assert str(first) not in every and len(every) == 29
    check_args = check_data.get_args_parser().parse_args([str(folder), "--corrections", str(path)])
    assert check_args.corrections == str(path)



def test_photo_keys_resolve_as_photo_key_does(tmp_path, monkeypatch):
    """The batched keys (a folder resolved once, only links followed) equal photo_key's on
    plain files, links relative and absolute, chains of links, a linked folder, a dangling
    link and a relative path with "..": the keys decisions are matched by."""
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "a.jpg").write_bytes(b"a")
    (real / "sub" / "b.jpg").write_bytes(b"b")
    links = tmp_path / "links"
    links.mkdir()
    (links / "relative.jpg").symlink_to("../real/a.jpg")
    (links / "absolute.jpg").symlink_to(real / "sub" / "b.jpg")
    (links / "chain.jpg").symlink_to("relative.jpg")
    (links / "dangling.jpg").symlink_to("missing.jpg")
    (tmp_path / "folder_link").symlink_to(real / "sub")
    monkeypatch.chdir(tmp_path)
    paths = [real / "a.jpg", links / "relative.jpg", links / "absolute.jpg", links / "chain.jpg",
             links / "dangling.jpg", tmp_path / "folder_link" / "b.jpg",
             "links/../real/a.jpg", "links/chain.jpg"]
    assert photo_keys(paths) == [photo_key(path) for path in paths]
    assert photo_keys([links / "chain.jpg"]) == [str(real / "a.jpg")]
