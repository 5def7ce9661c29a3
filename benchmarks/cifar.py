"""CIFAR-10: the CNN trained from scratch against the frozen pretrained default, cold runs.

    python benchmarks/cifar.py ../shared/data/cifar10
    python benchmarks/cifar.py ../shared/data/cifar10 --skip_pretrained --json cifar.json
    python benchmarks/cifar.py ../shared/data/cifar10 --extra="--epochs 1"   # a quick check
    python benchmarks/cifar.py ../shared/data/cifar10 --skip_pretrained --cpu avx2  # no bf16

Each row is one `train.py data_dir` run as a subprocess with its own defaults, cold: imports,
decoding and (for the pretrained backbone) feature extraction included, a fresh --save_dir and
--cache_dir. It prints wall seconds, CPU seconds of the run (user + system, all its processes:
divided by the cores it is the wall time an otherwise idle machine would approach), the best
epoch's valid accuracy, test accuracy and checkpoint size, then issue 14's goal (the CNN row:
>= 88% test accuracy within 20 minutes on a 2-core CPU; issue 31: on every CPU class, bf16 or
not), marked met or NOT met. Each run's log is kept in --output. --cpu runs every train.py as on
another CPU class (benchmarks/as_cpu.py: float32 where the CPU has no bf16).
"""
import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import as_cpu  # benchmarks/as_cpu.py: this script's folder is on the path
from flower_classifier.cli.options import HelpFormatter
from flower_classifier.models.backbones import DEFAULT_ARCH
from flower_classifier.models.checkpoint import load_checkpoint

CNN_ARCH = "cnn"
GOAL_ACCURACY = 0.88
GOAL_SECONDS = 20 * 60


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("data_dir", help="CIFAR-10 in the train/ valid/ test/ layout")
    parser.add_argument("--output", default=None, help="where each run's save_dir, cache and "
                        "log go (default: a temporary folder, removed afterwards)")
    parser.add_argument("--skip_pretrained", action="store_true",
                        help=f"run only the CNN, not the frozen {DEFAULT_ARCH} for comparison")
    parser.add_argument("--extra", default="", help="more train.py flags for every run, "
                        "e.g. \"--epochs 1\" for a quick check (then the goal does not apply)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--cpu", choices=tuple(as_cpu.LIMITS), default="native",
                        help="run train.py as on this CPU class (benchmarks/as_cpu.py)")
    return parser


def cold_run(name, data_dir, flags, output, cpu="native"):
    """One train.py run in a fresh folder, as on the CPU class cpu; its figures, read back from
    what it saved."""
    save_dir, cache_dir = output / name / "run", output / name / "cache"
    log_path = output / name / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    simulated = [] if cpu == "native" else [as_cpu.__file__, cpu]
    command = [sys.executable, *simulated, "train.py", str(data_dir), "--save_dir", str(save_dir),
               "--cache_dir", str(cache_dir), *flags]
    print(f"{name}: {shlex.join(command)}", flush=True)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        finished = subprocess.run(command, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (children.ru_utime - children_before.ru_utime
           + children.ru_stime - children_before.ru_stime)
    if finished.returncode:
        raise SystemExit(f"{name} failed (exit {finished.returncode}); see {log_path}")
    checkpoint_path = save_dir / "checkpoint.pth"
    checkpoint = load_checkpoint(checkpoint_path)
    report_path = save_dir / "test_report.json"
    test = json.loads(report_path.read_text())["accuracy"] if report_path.is_file() else None
    return {"name": name, "command": shlex.join(command), "wall_seconds": wall,
            "cpu_seconds": cpu, "epochs": checkpoint["hyperparameters"]["epochs"],
            "best_epoch": checkpoint["epoch"],
            "valid_accuracy": checkpoint["metrics"]["valid_accuracy"], "test_accuracy": test,
            "checkpoint_mb": checkpoint_path.stat().st_size / 1e6, "log": str(log_path)}


def percent(value):
    return "-" if value is None else f"{value:.2%}"


def print_rows(rows, quick, cpu="native"):
    print(f"\n{'run':<34} {'wall s':>8} {'cpu s':>8} {'epochs':>7} {'valid':>8} {'test':>8} "
          f"{'checkpoint':>11}")
    for row in rows:
        print(f"{row['name']:<34} {row['wall_seconds']:8.0f} {row['cpu_seconds']:8.0f} "
              f"{row['best_epoch']:>3}/{row['epochs']:<3} {percent(row['valid_accuracy']):>8} "
              f"{percent(row['test_accuracy']):>8} {row['checkpoint_mb']:8.1f} MB")
    cnn = rows[0]
    if quick:
        print("\ngoal not judged: --extra changes the default run")
        return
    met = (cnn["test_accuracy"] or 0) >= GOAL_ACCURACY and cnn["wall_seconds"] <= GOAL_SECONDS
    print(f"\ngoal: {CNN_ARCH} >= {GOAL_ACCURACY:.0%} test accuracy within "
          f"{GOAL_SECONDS // 60} minutes cold (CPU class {cpu}): "
          f"{percent(cnn['test_accuracy'])} in "
          f"{cnn['wall_seconds'] / 60:.1f} minutes ({cnn['cpu_seconds'] / os.cpu_count() / 60:.1f}"
          f" minutes of CPU time per core): {'met' if met else 'NOT met'}")


def main(args):
    extra = shlex.split(args.extra)
    runs = [(f"{CNN_ARCH} (from scratch)", ["--arch", CNN_ARCH, *extra])]
    if not args.skip_pretrained:
        runs.append((f"{DEFAULT_ARCH} (frozen, pretrained)", extra))
    with tempfile.TemporaryDirectory() as temporary:
        output = Path(args.output or temporary)
        rows = [cold_run(name.split()[0], args.data_dir, flags, output, args.cpu)
                for name, flags in runs]
    for row, (name, _) in zip(rows, runs):
        row["name"] = name
    print_rows(rows, quick=bool(extra), cpu=args.cpu)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
