"""Predicting a whole photo archive into one JSON-lines file: streamed, split across torchrun
processes, resumable after any crash, merged and checked at the end.

    python predict.py photos/ checkpoint.pth --output preds.jsonl            # --resume after a crash
    torchrun --nproc_per_node 4 predict.py photos/ checkpoint.pth --output preds.jsonl --gpu

While it runs, every process appends to its own part, preds.jsonl.parts/attempt-A.rank-R.jsonl,
one line per image ({"index": position in the input, then predict.py --json's object}), flushed
and synced per batch, and writes attempt-A.rank-R.done when its share is finished. Rank 0 then
merges the parts of every attempt into preds.jsonl (atomically: it is either absent or complete
and checked), whose first line names the model and the input, and removes the parts.

A rerun with --resume skips every image some part already holds: each attempt writes new parts
and never touches earlier ones, so a process killed mid-write loses at most its batch under way
(an incomplete last line is ignored). Nothing holds the list of images: the input is listed as a
stream in a fixed order (data.folders.iter_images, or the file list's order), the images done are
a merge of the parts (each in input order), and what remains is split by index modulo the
number of processes (distributed.shard), never padded.
"""
import hashlib
import heapq
import json
import os
import shutil
import time
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

from flower_classifier.data.folders import iter_images
from flower_classifier.utils import distributed
from flower_classifier.utils.console import progress
from flower_classifier.utils.errors import UserError, error_reason
from flower_classifier.utils.files import atomic_write

FORMAT = "predict.py archive 1"


@dataclass
class Archive:
    """Where the predictions of one input go, and what made them (written to run.json)."""
    output: Path
    source: Path  # as given: the lines' paths start with it
    kind: str  # "folder", "file_list" or "image"
    model: dict  # the checkpoint's hash and the settings that shape each line

    @property
    def parts(self):
        return self.output.with_name(self.output.name + ".parts")

    def part(self, attempt, rank):
        return self.parts / f"attempt-{attempt}.rank-{rank}.jsonl"

    def done_marker(self, attempt, rank):
        return self.parts / f"attempt-{attempt}.rank-{rank}.done"

    @property
    def input(self):
        """The input's identity: its kind and absolute path (the lines keep the paths as
        given)."""
        return {self.kind: os.path.abspath(self.source)}

    def header(self, engine):
        return {"format": FORMAT, "model": self.model, "input": self.input, "engine": engine}


def model_identity(checkpoint, predictor, top_k):
    """What makes two runs' lines interchangeable: the checkpoint's bytes, the display names,
    top_k and the unknown threshold."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    names = hashlib.sha256(json.dumps(predictor.names).encode()).hexdigest()
    return {"checkpoint": str(checkpoint), "sha256": digest.hexdigest(), "names_sha256": names,
            "top_k": top_k, "unknown_threshold": predictor.unknown_threshold}


def input_paths(archive):
    """The input's image paths, streamed, in the fixed order that indexes them."""
    if archive.kind == "folder":
        return iter_images(archive.source)
    if archive.kind == "image":
        return iter([str(archive.source)])
    return file_list_paths(archive.source)


def file_list_paths(path):
    """The non-empty lines of a file list, as written (relative paths are taken from the
    current folder)."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line := line.rstrip("\r\n"):
                    yield line
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read file list {path} ({error_reason(error)}); pass a UTF-8 "
                        "text file with one image path per line") from None


def part_lines(archive, path, engine):
    """(index, line) of every complete line of a part, after checking its first line (the
    run's header) against this run; an incomplete last line (the process died while writing
    it) is left out: its image is predicted again."""
    with open(path, encoding="utf-8") as handle:
        header = handle.readline()
        if not header.endswith("\n"):
            return
        try:
            check_header(archive, json.loads(header), engine, path)
        except json.JSONDecodeError:
            raise UserError(f"{path} is damaged (its first line is not a run header); delete "
                            "it to predict its images again") from None
        for line in handle:
            if not line.endswith("\n"):
                return
            try:
                yield json.loads(line)["index"], line
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path} is damaged (a line is not a prediction); delete it to "
                                "predict its images again") from None


def parts_of(archive):
    """Every part file of every attempt, in attempt and rank order."""
    if not archive.parts.is_dir():
        return []
    return sorted(archive.parts.glob("attempt-*.rank-*.jsonl"),
                  key=lambda path: [int(number) for number in
                                    path.stem.replace("attempt-", "").split(".rank-")])


def done_lines(archive, engine):
    """(index, line) of every image already predicted, in input order (a merge of the parts,
    each of which is in input order)."""
    return heapq.merge(*(part_lines(archive, path, engine) for path in parts_of(archive)),
                       key=lambda item: item[0])


def joined(archive, engine):
    """(index, path, line or None) for every image of the input, in order: the line that
    predicts it, or None if none does yet. A part line that does not match the input (another
    file list, or a folder changed since the run began) is a UserError."""
    done = done_lines(archive, engine)
    pending = next(done, None)
    for index, path in enumerate(input_paths(archive)):
        line = None
        if pending is not None and pending[0] == index:
            line = pending[1]
            predicted = json.loads(line)["path"]
            if predicted != path:
                raise UserError(f"{archive.parts} does not match the input: image {index} is "
                                f"{path}, but was {predicted} when the run began; restore the "
                                "input, or choose another --output")
            pending = next(done, None)
            if pending is not None and pending[0] == index:
                raise UserError(f"{archive.parts} predicts {path} twice; delete the folder "
                                "and predict again")
        yield index, path, line
    if pending is not None:
        raise UserError(f"{archive.parts} holds predictions past the input's last image "
                        f"(image {pending[0]}); restore the input, or choose another --output")


def remaining(archive, engine):
    """(index, path) of every image no part holds yet, in input order."""
    return ((index, path) for index, path, line in joined(archive, engine) if line is None)


def read_header(archive):
    try:
        return json.loads((archive.parts / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def check_header(archive, header, engine, source=None):
    """A UserError naming what differs between the run that wrote header (in source, by
    default archive.parts) and this one."""
    source = source or archive.parts
    if header is None or header.get("format") != FORMAT:
        raise UserError(f"{source} is not a predict.py run in progress (its header is missing "
                        "or damaged); delete it, or choose another --output")
    model, ours = header["model"], archive.model
    if model["sha256"] != ours["sha256"]:
        raise UserError(f"{source} holds predictions of another checkpoint "
                        f"({model['checkpoint']}, sha256 {model['sha256'][:12]}); pass that "
                        "checkpoint, or choose another --output")
    for setting in ("top_k", "unknown_threshold", "names_sha256"):
        if model[setting] != ours[setting]:
            flag = {"names_sha256": "category_names"}.get(setting, setting)
            raise UserError(f"{source} was begun with another --{flag} "
                            f"({model[setting]}, now {ours[setting]}); pass the same, or "
                            "choose another --output")
    if header["input"] != archive.input:
        raise UserError(f"{source} holds predictions of another input "
                        f"({' '.join(map(str, *header['input'].items()))}); pass that input, "
                        "or choose another --output")
    if engine not in ("auto", header["engine"]):
        raise UserError(f"{source} was begun with engine {header['engine']}; pass "
                        f"--engine {header['engine']} (or auto) so all lines match")


def begin(archive, resume, predictor):
    """Rank 0's start: check what is on disk, record the run, and return (attempt number, the
    engine, the images left to predict). A new run takes the engine predictor.engine stands
    for with a job of all the images; a resumed one keeps its engine."""
    if archive.output.exists():
        if not resume:
            raise UserError(f"{archive.output} exists; pass --resume to finish or check it, or "
                            "choose another --output")
        return None, None, 0
    header = read_header(archive)
    if archive.parts.exists() and not resume:
        raise UserError(f"{archive.parts} holds an unfinished run; pass --resume to finish it, "
                        "or delete it to start again")
    if header is None:
        if archive.parts.exists() and any(archive.parts.iterdir()):
            check_header(archive, header, "auto")
        images = sum(1 for _ in input_paths(archive))
        if not images:
            raise UserError(f"{archive.source} holds no images; pass a folder with JPEG or PNG "
                            "files, or a file list naming them")
        header = archive.header(predictor.backbone_engine(images).name)
        archive.parts.mkdir(parents=True, exist_ok=True)
        atomic_write(archive.parts / "run.json", lambda temporary: Path(temporary).write_text(
            json.dumps(header), encoding="utf-8"))
        return 1, header["engine"], images
    check_header(archive, header, predictor.engine)
    attempts = [int(path.name.split(".")[0].removeprefix("attempt-"))
                for path in archive.parts.glob("attempt-*")]
    left = sum(1 for _ in remaining(archive, header["engine"]))
    return max(attempts, default=0) + 1, header["engine"], left


def predict_share(archive, attempt, engine, predictions):
    """Write this process's part: the run's header, then its predictions, one synced write
    per batch; yields the images of each batch. predictions: lists of (index, Prediction)."""
    rank = distributed.rank()
    with open(archive.part(attempt, rank), "w", encoding="utf-8") as handle:
        write_synced(handle, json.dumps(archive.header(engine)) + "\n")
        for batch in predictions:
            write_synced(handle, "".join(json.dumps({"index": index, **prediction.as_json()})
                                         + "\n" for index, prediction in batch))
            yield len(batch)
    atomic_write(archive.done_marker(attempt, rank),
                 lambda temporary: Path(temporary).write_text("done\n"))


def write_synced(handle, text):
    """Write text and make it durable: a power cut then loses at most the batch under way."""
    handle.write(text)
    handle.flush()
    os.fsync(handle.fileno())


class PartWatcher:
    """How many lines the other processes' parts of this attempt have gained since last asked
    (rank 0's progress sums every process), reading only what was appended."""

    def __init__(self, archive, attempt):
        self.archive, self.attempt = archive, attempt
        self.offsets = {rank: 0 for rank in range(1, distributed.world_size())}

    def new_lines(self):
        count = 0
        for rank, offset in self.offsets.items():
            try:
                with open(self.archive.part(self.attempt, rank), "rb") as handle:
                    handle.seek(offset)
                    appended = handle.read()
            except FileNotFoundError:
                continue
            complete = appended.rfind(b"\n") + 1
            self.offsets[rank] += complete
            count += appended.count(b"\n", 0, complete)
        return count

    def all_done(self):
        return all(self.archive.done_marker(self.attempt, rank).exists()
                   for rank in range(distributed.world_size()))


def images_done(archive, attempt, own_batches, poll_seconds=0.5):
    """Rank 0: a None per image predicted by any process, until every process is done."""
    watcher = PartWatcher(archive, attempt)
    for images in own_batches:
        yield from repeat(None, images + watcher.new_lines())
    while not watcher.all_done():
        time.sleep(poll_seconds)
        yield from repeat(None, watcher.new_lines())
    yield from repeat(None, watcher.new_lines())


def merge(archive, engine):
    """Write the output from every part, in input order, after checking that each image of the
    input appears exactly once; then remove the parts. Returns the number of images."""
    images = 0

    def write(temporary):
        nonlocal images
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(archive.header(engine)) + "\n")
            for index, path, line in joined(archive, engine):
                if line is None:
                    raise UserError(f"{archive.parts} has no prediction for {path}; run again "
                                    "with --resume to predict what is missing")
                prediction = json.loads(line)
                del prediction["index"]
                handle.write(json.dumps(prediction) + "\n")
                images += 1

    atomic_write(archive.output, write)
    shutil.rmtree(archive.parts)
    return images


def predict_archive(archive, predictor, resume, top_k, batch_size, workers):
    """The whole run on this process (one of torchrun's, or alone): returns the number of
    images in the output on rank 0, None on the others."""
    plan = None
    if distributed.is_main():
        try:
            plan = begin(archive, resume, predictor)
        except UserError as error:
            plan = str(error)
    plan = distributed.gather_objects(plan)[0]  # every process waits for rank 0's check
    if isinstance(plan, str):
        raise UserError(plan)
    attempt, engine, left = plan
    if attempt is None:
        return finished_output(archive) if distributed.is_main() else None
    if not distributed.is_main():
        header = read_header(archive)
        if header is None:
            raise UserError(f"cannot read {archive.parts / 'run.json'}, which rank 0 wrote: "
                            "every machine must see the same --output folder (a shared one)")
        check_header(archive, header, predictor.engine)
    predictor.engine = engine
    predictions = predictor.predict_batches(distributed.shard(remaining(archive, engine)),
                                            top_k, batch_size, workers, job_size=left)
    batches = predict_share(archive, attempt, engine, predictions)
    if not distributed.is_main():
        for _ in batches:
            pass
        return None
    for _ in progress(images_done(archive, attempt, batches), left, "predicting", unit="images"):
        pass
    return merge(archive, engine)


def finished_output(archive):
    """--resume on a finished output: nothing to predict; the number of its images, after
    checking that it is this run's."""
    with open(archive.output, encoding="utf-8") as handle:
        try:
            header = json.loads(handle.readline())
        except json.JSONDecodeError:
            header = None
        check_header(archive, header, "auto", archive.output)
        return sum(1 for _ in handle)
