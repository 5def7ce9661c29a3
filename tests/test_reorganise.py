"""Applying decisions to the folders (data/reorganise.py): relabelled photos move into their
class's folder, dropped ones into a set-aside folder; nothing is deleted, undo puts all back."""
import json

from conftest import link_class_folders

from flower_classifier.data.corrections import load_corrections, record_decisions
from flower_classifier.data.reorganise import apply_moves, plan_moves, undo_moves
from flower_classifier.data.split import load_dataset


def listing(root):
    return sorted((path.relative_to(root).as_posix(), str(path.resolve()))
                  for path in root.rglob("*.jpg"))


def test_moves_are_logged_never_delete_and_undo_puts_every_photo_back(tmp_path):
    photos = link_class_folders(tmp_path / "photos", 8, ("1", "10", "2"))
    before = listing(photos)
    relabel, drop = sorted((photos / "1").iterdir())[:2]
    relabel_file, drop_file = relabel.resolve(), drop.resolve()
    (photos / "10" / relabel.name).symlink_to(relabel_file)  # the name is taken there
    record_decisions(tmp_path / "corrections.json", {relabel: "10", drop: None})
    dataset = load_dataset(photos)
    moves = plan_moves(dataset, load_corrections(tmp_path / "corrections.json"), photos,
                       tmp_path / "set_aside")
    assert sorted(target for _, target in moves) == sorted([
        str(photos / "10" / f"{relabel.stem}_1.jpg"), str(tmp_path / "set_aside" / "1" / drop.name)])
    assert apply_moves(moves, tmp_path / "moves.jsonl") == 2
    assert (photos / "10" / f"{relabel.stem}_1.jpg").is_symlink()  # a link stays a link
    assert (tmp_path / "set_aside" / "1" / drop.name).resolve() == drop_file
    assert not relabel.exists() and not drop.is_symlink()
    log = [json.loads(line) for line in (tmp_path / "moves.jsonl").read_text().splitlines()]
    assert [entry["from"] for entry in log] == [source for source, _ in moves]
    assert undo_moves(tmp_path / "moves.jsonl") == 2
    assert listing(photos) == sorted([*before, (f"10/{relabel.name}", str(relabel_file))])
    assert relabel_file.is_file() and drop_file.is_file()  # the shared photos themselves
    assert (tmp_path / "moves.jsonl.undone").is_file()
