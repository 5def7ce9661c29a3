"""How fast train.py trains, compared with the assignment's loop and with the floor.

    python benchmarks/train_speed.py ../shared/data/flowers102 --epochs 10
    python benchmarks/train_speed.py ../shared/data/flowers102 --epochs 2 \\
        --classes 3 --max_per_class 6                   # a quick check on a tiny subset
    python benchmarks/train_speed.py ../shared/data/flowers102 --skip_assignment --json speed.json

In one process, on the same backbone, head hyperparameters (train.py's head-alone defaults, as
--train_stages 0 resolves them), epochs and data:

  floor        one forward pass of the backbone over every image train.py's default run needs,
               the fastest way the project has (FeatureExtractor.compute: traced, channels-last)
  assignment   the classic loop: the whole model (eager backbone + head) on freshly augmented
               images every epoch, a validation pass through the whole model every epoch
  train.py     as subprocesses, imports included: cold (empty feature cache), then warm (same
               cache, other head hyperparameters)
  predict.py   a subprocess on the test folder and on one image, predict_folder in-process, and
               `python -c "import torch, torchvision"` as the start-up yardstick

It prints wall seconds, images/s, peak resident memory and test accuracy of each, then the
ratios against the project's goals, each marked met or NOT met. Peak memory is that of the main
process, DataLoader workers not added in: for in-process phases this process's VmRSS sampled
every 20 ms (so it includes what the benchmark already holds), for subprocesses their VmHWM.
"""
import argparse
import copy
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from flower_classifier.cli.options import non_negative_int, positive_int
from flower_classifier.data.folders import class_folders, find_splits
from flower_classifier.data.images import is_image_file
from flower_classifier.data.loading import ImageFiles, default_workers, image_loader
from flower_classifier.data.transforms import augment_transform, eval_transform
from flower_classifier.inference.predictor import BATCH_SIZE, Predictor
from flower_classifier.models.backbones import build_backbone
from flower_classifier.models.checkpoint import CHECKPOINT_NAME
from flower_classifier.models.classifier import ImageClassifier, build_head
from flower_classifier.models.features import FeatureExtractor
from flower_classifier.training.config import TrainConfig
from flower_classifier.training.tasks import cached
from flower_classifier.utils.errors import UserError

CPU = torch.device("cpu")
# Head hyperparameters of the warm run: other than the defaults, so only the cache is reused.
WARM_HEAD = ["--hidden_units", "256", "--learning_rate", "0.002", "--dropout", "0.3"]
GOAL_EPOCHS = 10  # the epochs at which the issue sets the train.py vs assignment goal


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Time train.py against the assignment's training loop and the backbone's "
        "one-pass floor.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data_dir", help="folder with train/, valid/ and test/, each holding one "
                        "folder of images per class")
    parser.add_argument("--epochs", type=positive_int, default=10,
                        help="training epochs of every run")
    parser.add_argument("--classes", type=positive_int, default=None, metavar="K",
                        help="use only the first K class folders, in sorted order (None: all)")
    parser.add_argument("--max_per_class", type=positive_int, default=None, metavar="M",
                        help="at most M images per class and split (None: all)")
    parser.add_argument("--skip_assignment", action="store_true",
                        help="leave out the assignment's loop, the slow phase (about 17 images/s "
                        "x (train + valid) x epochs on a laptop CPU)")
    parser.add_argument("--workers", type=non_negative_int, default=default_workers(),
                        help="processes decoding images, in every phase")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also save the figures as JSON")
    return parser


def note(message):
    print(message, file=sys.stderr, flush=True)


# ---- data -------------------------------------------------------------------------------------

def subset_folder(data_dir, classes, max_per_class, into):
    """data_dir rebuilt from symlinks (never copies): the first `classes` class folders, at most
    `max_per_class` images of each per split."""
    data_dir, into = Path(data_dir).resolve(), Path(into)
    kept = class_folders(data_dir / "train")[:classes]
    for split in ("train", "valid", "test"):
        for name in kept:
            source = data_dir / split / name
            if not source.is_dir():
                continue
            images = sorted(path for path in source.iterdir()
                            if path.is_file() and is_image_file(str(path)))
            target = into / split / name
            target.mkdir(parents=True)
            for image in images[:max_per_class]:
                (target / image.name).symlink_to(image)
    category_names = data_dir / "cat_to_name.json"
    if category_names.is_file():
        (into / category_names.name).symlink_to(category_names)
    return into


def read_all_files(splits):
    """Read every image once, so no phase pays for the first read from disk."""
    for split in splits.values():
        for path in split.paths:
            Path(path).read_bytes()


# ---- measuring ----------------------------------------------------------------------------------

def maxrss_kib(ru_maxrss):
    """rusage's ru_maxrss in KiB: Linux gives KiB, macOS bytes."""
    return ru_maxrss // 1024 if sys.platform == "darwin" else ru_maxrss


def proc_status_kib(pid, field):
    """A memory field of /proc/PID/status in KiB; None where /proc is absent or pid has exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """The peak of a process's memory field (this process's VmRSS, or a child's VmHWM) while the
    block runs, sampled every 20 ms; peak_kib stays None where /proc is absent."""

    def __init__(self, pid="self", field="VmRSS"):
        self.pid, self.field, self.peak_kib = pid, field, None

    def __enter__(self):
        self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        value = proc_status_kib(self.pid, self.field)
        if value is not None:
            self.peak_kib = max(self.peak_kib or 0, value)

    def _sample(self):
        while not self._stop.wait(0.02):
            self._read()

    def __exit__(self, *exception):
        self._stop.set()
        self._thread.join()
        self._read()


def timed(work):
    """(work's result, wall seconds, peak MiB of this process) of work(); where /proc is absent
    the peak is the process's lifetime peak."""
    with PeakMemory() as memory:
        started = time.perf_counter()
        result = work()
        wall = time.perf_counter() - started
    peak_kib = memory.peak_kib or maxrss_kib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return result, wall, peak_kib / 1024


def run_python(arguments, log_path):
    """(wall seconds, peak MiB) of `python ARGUMENTS` run in the project root; on failure, print
    the end of its log and exit. The peak is the child's VmHWM, polled: the ru_maxrss that wait4
    returns is no good on Linux, where exec carries the parent's peak over into the child's (every
    child of a 1.2 GB benchmark would read 1.2 GB); it serves only where /proc is absent."""
    with open(log_path, "w") as log:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, *map(str, arguments)], cwd=PROJECT,
                                 stdout=log, stderr=subprocess.STDOUT)
        with PeakMemory(child.pid, "VmHWM") as memory:
            _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"{tail}\nbenchmark stopped: `python {' '.join(map(str, arguments))}` "
                         f"failed with exit code {child.returncode} (its log's last lines above)")
    return wall, (memory.peak_kib or maxrss_kib(usage.ru_maxrss)) / 1024


def best_of(runs, arguments, log_path):
    """The fastest of a few runs, (wall, peak MiB), to keep start-up timings free of noise."""
    return min(run_python(arguments, log_path) for _ in range(runs))


def phase(name, images, backbone, wall, peak_mib, accuracy=None):
    """One row of the table; backbone counts the images that went through the backbone (None:
    unknown)."""
    return {"phase": name, "images": images, "backbone": backbone, "wall_s": wall,
            "images_per_s": images / wall if wall else None, "peak_mib": peak_mib,
            "test_accuracy": accuracy}


# ---- the phases -------------------------------------------------------------------------------

def floor_datasets(splits, backbone, defaults):
    """What train.py's default run puts through the backbone: every split once, plus the
    --augment views of train."""
    preprocess, crop = backbone.preprocess, backbone.preprocess.crop
    datasets = [(name, ImageFiles(split.paths, eval_transform(preprocess), crop))
                for name, split in splits.items()]
    training = splits["train"]
    for view in range(1, defaults.augment + 1):
        seeds = [cached.view_seed(defaults.seed, view, path, training.root)
                 for path in training.paths]
        datasets.append((f"train view {view}", ImageFiles(training.paths,
                                                          augment_transform(preprocess), crop,
                                                          seeds=seeds)))
    return datasets


def measure_floor(splits, defaults, workers):
    """One backbone pass over the images, timed without start-up or tracing: the least any
    frozen-backbone training can cost."""
    backbone = build_backbone(defaults.arch)
    started = time.perf_counter()
    extractor = FeatureExtractor(backbone, CPU, batch_size=max(defaults.batch_size, 32),
                                 workers=workers)
    note(f"floor: backbone traced in {time.perf_counter() - started:.1f} s (not timed)")
    datasets = floor_datasets(splits, backbone, defaults)

    def forward_all():
        for description, dataset in datasets:
            extractor.compute(dataset, description)

    _, wall, peak = timed(forward_all)
    images = sum(len(dataset) for _, dataset in datasets)
    return phase("floor: backbone once", images, images, wall, peak)


def train_one_epoch(model, loader, optimizer, criterion):
    """The assignment's epoch: every augmented batch through backbone and head. The backbone
    stays in eval mode (frozen BatchNorm statistics), as in train.py."""
    model.head.train()
    loss_sum, count = 0.0, 0
    for images, labels, ok in loader:
        images, labels = images[ok], labels[ok]
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(labels)
        count += len(labels)
    return loss_sum / max(1, count)


@torch.no_grad()
def accuracy(model, loader):
    model.eval()
    correct = count = 0
    for images, labels, ok in loader:
        correct += (model(images[ok]).argmax(1) == labels[ok]).sum().item()
        count += ok.sum().item()
    return correct / max(1, count)


def run_assignment(splits, class_count, defaults, epochs, workers):
    """The Udacity assignment's way: the eager backbone recomputed on augmented images every
    epoch, validation through the whole model every epoch, the best-validation head tested."""
    backbone = build_backbone(defaults.arch)
    torch.manual_seed(defaults.seed)
    head = build_head(backbone.feature_dim, class_count, defaults.hidden_units, defaults.dropout)
    model = ImageClassifier(backbone, head)
    optimizer = torch.optim.Adam(head.parameters(), lr=defaults.learning_rate)
    criterion = nn.CrossEntropyLoss()
    preprocess, crop = backbone.preprocess, backbone.preprocess.crop

    def loader(split, transform, shuffle=False):
        dataset = ImageFiles(split.paths, transform, crop, split.labels)
        return image_loader(dataset, defaults.batch_size, workers, CPU, shuffle=shuffle)

    def fit_and_test():
        best_valid, best_head = -1.0, None
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            loss = train_one_epoch(model, loader(splits["train"], augment_transform(preprocess),
                                                 shuffle=True), optimizer, criterion)
            valid = accuracy(model, loader(splits["valid"], eval_transform(preprocess)))
            if valid > best_valid:
                best_valid, best_head = valid, copy.deepcopy(head.state_dict())
            note(f"assignment epoch {epoch}/{epochs}: train loss {loss:.4f}  valid accuracy "
                 f"{valid:.2%}  {time.perf_counter() - started:.1f} s")
        head.load_state_dict(best_head)
        return accuracy(model, loader(splits["test"], eval_transform(preprocess)))

    test_accuracy, wall, peak = timed(fit_and_test)
    images = epochs * (len(splits["train"].paths) + len(splits["valid"].paths)) + len(
        splits["test"].paths)
    return phase("assignment loop", images, images, wall, peak, test_accuracy)


def run_train(name, data_dir, work, cache_dir, images, epochs, workers, extra=()):
    """train.py as a user runs it, imports included; accuracy from its test_report.json and
    the images it put through the backbone from its log."""
    save_dir, log_path = work / name, work / f"{name}.log"
    note(" ".join([f"{name}: python train.py {data_dir} --epochs {epochs}", *extra]))
    wall, peak = run_python([PROJECT / "train.py", data_dir, "--save_dir", save_dir,
                             "--cache_dir", cache_dir, "--epochs", epochs, "--workers", workers,
                             *extra], log_path)
    report = json.loads((save_dir / "test_report.json").read_text())
    extracted = re.search(r"features ready: (\d+) images through the backbone",
                          log_path.read_text())
    return phase(f"train.py {name}", images, int(extracted.group(1)) if extracted else None,
                 wall, peak, report["accuracy"])


def measure_predict_folder(checkpoint, test, class_names, batch_size, workers):
    """Predictor.predict_files' throughput once the checkpoint is loaded: what predict.py
    does per image of a folder."""
    predictor = Predictor(checkpoint, CPU)

    def predict_all():
        return list(predictor.predict_files(test.paths, 1, batch_size, workers))

    results, wall, peak = timed(predict_all)
    correct = sum(result.ok and result.classes[0] == class_names[label]
                  for result, label in zip(results, test.labels))
    return phase("predict_folder in-process", len(test.paths), len(test.paths), wall, peak,
                 correct / max(1, len(test.paths)))


def run_predict(checkpoint, test, work, workers):
    """predict.py on the test folder and on one image, and the bare `import torch, torchvision`
    that any such command pays first."""
    note("predict.py on the test folder, then on one image (best of 3), then the import")
    wall, peak = run_python([PROJECT / "predict.py", test.root, checkpoint, "--json",
                             "--workers", workers], work / "predict_folder.log")
    folder = phase("predict.py test folder", len(test.paths), len(test.paths), wall, peak)
    wall, peak = best_of(3, [PROJECT / "predict.py", test.paths[0], checkpoint],
                         work / "predict_one.log")
    one = phase("predict.py one image", 1, 1, wall, peak)
    wall, peak = best_of(3, ["-c", "import torch, torchvision"], work / "import.log")
    return folder, one, phase("import torch, torchvision", 0, 0, wall, peak)


# ---- report -----------------------------------------------------------------------------------

def goal(name, value, target, met, unit=""):
    return {"goal": name, "value": value, "target": target, "unit": unit, "met": met}


def goals(rows, epochs):
    """Each figure the issue asks for, with its target and whether it is met."""
    floor, cold, warm = rows["floor"], rows["cold"], rows["warm"]
    checks = [goal("train.py cold wall / floor wall", cold["wall_s"] / floor["wall_s"],
                   "<= 1.25", cold["wall_s"] <= 1.25 * floor["wall_s"], "x"),
              goal("train.py warm wall, other head", warm["wall_s"], "<= 20 s",
                   warm["wall_s"] <= 20, " s")]
    if "assignment" in rows:
        assignment = rows["assignment"]
        at = "" if epochs == GOAL_EPOCHS else f" (goal set at {GOAL_EPOCHS} epochs)"
        checks += [goal(f"assignment wall / train.py cold wall{at}",
                        assignment["wall_s"] / cold["wall_s"], ">= 8",
                        assignment["wall_s"] >= 8 * cold["wall_s"], "x"),
                   goal("test accuracy train.py cold - assignment",
                        100 * (cold["test_accuracy"] - assignment["test_accuracy"]), ">= 0 points",
                        cold["test_accuracy"] >= assignment["test_accuracy"], " points")]
    inside = rows["predict_inside"]
    checks += [goal("predict_folder images/s / floor images/s",
                    inside["images_per_s"] / floor["images_per_s"], ">= 0.9",
                    inside["images_per_s"] >= 0.9 * floor["images_per_s"], "x"),
               goal("predict.py one image wall / import torch, torchvision wall",
                    rows["predict_one"]["wall_s"] / rows["import"]["wall_s"], "<= 1.5",
                    rows["predict_one"]["wall_s"] <= 1.5 * rows["import"]["wall_s"], "x")]
    return checks


def print_table(phases):
    header = (f"{'phase':<28}{'images':>8}{'backbone':>10}{'wall s':>9}{'images/s':>10}"
              f"{'peak MiB':>10}{'test acc':>10}")
    print(header)
    print("-" * len(header))
    for row in phases:
        rate = f"{row['images_per_s']:.1f}" if row["images"] else "-"
        backbone = "?" if row["backbone"] is None else row["backbone"]
        accuracy = "-" if row["test_accuracy"] is None else f"{row['test_accuracy']:.2%}"
        print(f"{row['phase']:<28}{row['images']:>8}{backbone:>10}{row['wall_s']:>9.2f}"
              f"{rate:>10}{row['peak_mib']:>10.0f}{accuracy:>10}")


def print_goals(checks):
    print()
    for check in checks:
        verdict = "met" if check["met"] else "NOT met"
        print(f"{check['goal']:<66}{check['value']:>8.2f}{check['unit']:<8} goal "
              f"{check['target']:<12}{verdict}")


# ---- main ---------------------------------------------------------------------------------------

def prepare_data(args, work):
    """The data folder to benchmark (a symlinked subset when asked for) and its splits."""
    data_dir = Path(args.data_dir).resolve()
    if args.classes is not None or args.max_per_class is not None:
        data_dir = subset_folder(data_dir, args.classes, args.max_per_class, work / "data")
    class_to_idx, splits = find_splits(data_dir)
    if "test" not in splits or not splits["test"].paths:
        raise SystemExit(f"{data_dir} has no test/ images; the benchmark reports test accuracy")
    note(f"{len(class_to_idx)} classes; " + ", ".join(
        f"{name} {len(split.paths)} images" for name, split in splits.items()))
    return data_dir, class_to_idx, splits


def main(args):
    defaults = TrainConfig(args.data_dir).resolved(from_scratch=False)
    predict_batch = BATCH_SIZE  # predict.py's default
    with tempfile.TemporaryDirectory(prefix="train_speed_") as temporary:
        work = Path(temporary)
        data_dir, class_to_idx, splits = prepare_data(args, work)
        read_all_files(splits)
        rows = {}
        note("floor: one backbone pass over the images train.py needs")
        rows["floor"] = measure_floor(splits, defaults, args.workers)
        if not args.skip_assignment:
            note(f"assignment loop: {args.epochs} epochs, the backbone on every image each epoch")
            rows["assignment"] = run_assignment(splits, len(class_to_idx), defaults, args.epochs,
                                                args.workers)
        images = sum(len(split.paths) for split in splits.values())
        cache_dir = work / "cache"
        rows["cold"] = run_train("cold", data_dir, work, cache_dir, images, args.epochs,
                                 args.workers)
        rows["warm"] = run_train("warm", data_dir, work, cache_dir, images, args.epochs,
                                 args.workers, WARM_HEAD)
        checkpoint = work / "cold" / CHECKPOINT_NAME
        rows["predict_inside"] = measure_predict_folder(checkpoint, splits["test"],
                                                        list(class_to_idx), predict_batch,
                                                        args.workers)
        rows["predict_folder"], rows["predict_one"], rows["import"] = run_predict(
            checkpoint, splits["test"], work, args.workers)
    checks = goals(rows, args.epochs)
    print(f"\n{args.data_dir}: {len(class_to_idx)} classes, {args.epochs} epochs, "
          f"{args.workers} workers, {torch.get_num_threads()} threads, head "
          f"{defaults.hidden_units} units, lr {defaults.learning_rate}, batch "
          f"{defaults.batch_size}, augment {defaults.augment}\n")
    print_table(rows.values())
    print_goals(checks)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "data_dir": args.data_dir, "epochs": args.epochs, "classes": args.classes,
            "max_per_class": args.max_per_class, "workers": args.workers,
            "phases": list(rows.values()), "goals": checks}, indent=2) + "\n")
    return {"phases": rows, "goals": checks}


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
