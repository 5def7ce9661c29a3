"""Applying decisions to the folders themselves, on request: a relabelled photo moves into its
class's folder (in the split folder it is in), a dropped one into a set-aside folder outside the
data folder. Nothing is ever deleted or overwritten, and every move is logged first, so
undo_moves puts each photo back.

    moves = plan_moves(dataset, decisions, "photos", "studio/set_aside")
    apply_moves(moves, "studio/moves.jsonl")
    undo_moves("studio/moves.jsonl")
"""
import json
import os
import shutil
from pathlib import Path

from flower_classifier.data.corrections import photo_keys
from flower_classifier.utils.errors import UserError, error_reason


def free_name(path, taken):
    """path, or path with _1, _2... before its ending where a file (or a planned move) has it."""
    candidate, number = Path(path), 0
    while candidate.exists() or candidate.is_symlink() or str(candidate) in taken:
        number += 1
        candidate = Path(path).with_name(f"{Path(path).stem}_{number}{Path(path).suffix}")
    return candidate


def plan_moves(dataset, decisions, data_dir, set_aside):
    """[(from, to)] of the photos the decisions move: relabelled ones into the new class's folder
    beside their own, dropped ones into set_aside (their path below data_dir kept)."""
    classes, data_dir, taken, moves = list(dataset.class_to_idx), Path(data_dir), set(), []
    for split in dataset.splits.values():
        for path, label, key in zip(split.paths, split.labels, photo_keys(split.paths)):
            decision = decisions.get(key)
            if decision is None or decision["label"] == classes[label]:
                continue
            path = Path(path)
            if decision["label"] is None:
                target = Path(set_aside) / path.relative_to(data_dir)
            else:  # split root / class / [sub folders /] name -> split root / label / ...
                inside = path.relative_to(split.root).parts[1:]
                target = Path(split.root, decision["label"], *inside)
            target = free_name(target, taken)
            taken.add(str(target))
            moves.append((str(path), str(target)))
    return moves


def _log(handle, entry):
    handle.write(json.dumps(entry) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def move(source, target):
    """Move one directory entry (a link stays a link); never over an existing file."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(target):
        raise UserError(f"{target} appeared meanwhile; nothing was overwritten")
    shutil.move(source, target)


def apply_moves(moves, log_path):
    """Make the moves, each logged (fsynced) before it is made; returns how many were made."""
    try:
        with open(log_path, "a", encoding="utf-8") as handle:
            for source, target in moves:
                _log(handle, {"from": source, "to": target})
                move(source, target)
    except OSError as error:
        raise UserError(f"a move failed ({error_reason(error)}); the ones made are in "
                        f"{log_path}, which undo puts back") from None
    return len(moves)


def undo_moves(log_path):
    """Put back every logged move whose photo is still where it was moved (newest first), then
    keep the log as LOG.undone; returns how many were put back."""
    log_path = Path(log_path)
    if not log_path.is_file():
        return 0
    entries = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    back = 0
    for entry in reversed(entries):
        if os.path.lexists(entry["to"]) and not os.path.lexists(entry["from"]):
            move(entry["to"], entry["from"])
            back += 1
    os.replace(log_path, log_path.with_name(log_path.name + ".undone"))
    return back
