"""Issue 22's time goals: cold and warm train.py against one OpenVINO pass over the images.

    python benchmarks/train_time.py ../shared/data/flowers102
    python benchmarks/train_time.py ../shared/data/flowers102 --flags "--train_stages 2"

All rows come from one run on this machine (compare ratios, not seconds across machines):
  plain pass   OpenVINO over what the default run computes, train/ once and valid/ and test/ with
               their mirror images (converted model from disk, 1 decoding worker as train.py's
               default): the yardstick
  cold         train.py with an empty feature cache (a temp folder), default flags, then each
               --flags setting with its own empty cache
  warm         each setting's command again on its cache: nothing is extracted again
The goals: cold default <= 4x the pass; a warm --train_stages 0 run (pass it with --flags)
<= 12 s. Issue 31's: the cold default <= 2.5x the pass on each CPU class:

    python benchmarks/train_time.py ../shared/data/flowers102 --cpu avx2 --busy

--cpu runs the pass and every train.py run as on another CPU class (benchmarks/as_cpu.py);
--busy keeps one core busy with another process throughout (cpu_conditions.py's BusyCore).
"""
import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch


def sibling(name, module_name):
    """A benchmarks/ script as a module, under a name that does not shadow the project's."""
    spec = importlib.util.spec_from_file_location(module_name, Path(__file__).with_name(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


engine_rows = sibling("engines.py", "engine_rows")  # benchmarks/engines.py's rows
as_cpu, cpu_conditions = sibling("as_cpu.py", "as_cpu"), sibling("cpu_conditions.py", "cpu_rows")
engine_of, pass_over, row, run, seconds = (engine_rows.engine_of, engine_rows.pass_over,
                                           engine_rows.row, engine_rows.run, engine_rows.seconds)
from flower_classifier.data.folders import find_splits
from flower_classifier.models.backbones import DEFAULT_ARCH, build_backbone


def train_run(data_dir, work, name, flags, cpu):
    """(wall seconds, valid accuracy, test accuracy, the log) of one train.py run as on cpu."""
    save_dir = work / f"run-{name}"
    script = ["train.py"] if cpu == "native" else [Path(as_cpu.__file__), cpu, "train.py"]
    output, wall = run(*script, data_dir, "--save_dir", save_dir, "--cache_dir",
                       work / f"cache-{name}", *flags)
    checkpoint = torch.load(save_dir / "checkpoint.pth", weights_only=True)
    test = json.loads((save_dir / "test_report.json").read_text())["accuracy"]
    return wall, checkpoint["metrics"]["valid_accuracy"], test, output


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", help="flowers folder with train/, valid/ and test/")
    parser.add_argument("--flags", action="append", default=[],
                        help="train.py flags of a setting to time beside the default (repeatable)")
    parser.add_argument("--show_log", action="store_true", help="print each run's output")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="keep the runs (run-0 the default's, ...) and caches in DIR, which "
                        "must not exist (default: a temporary folder, removed)")
    parser.add_argument("--cpu", choices=tuple(as_cpu.LIMITS), default="native",
                        help="run the pass and every train.py run as on this CPU class "
                        "(benchmarks/as_cpu.py; default: native)")
    parser.add_argument("--busy", action="store_true",
                        help="keep one core busy with another process throughout")
    return parser


def main(args):
    if args.cpu != "native" and os.environ.get(as_cpu.SIMULATED) != args.cpu:
        # The limits must be set before torch and OpenVINO load: this script again, under them.
        os.execv(sys.executable, [sys.executable, as_cpu.__file__, args.cpu, __file__,
                                  *sys.argv[1:]])
    print(f"as on a CPU of class {args.cpu}{', one core busy' if args.busy else ''}")
    with cpu_conditions.BusyCore() if args.busy else contextlib.nullcontext():
        time_runs(args)


def time_runs(args):
    _, splits = find_splits(args.data_dir)
    backbone = build_backbone(DEFAULT_ARCH)
    engine = engine_of(backbone, "openvino")
    pass_over(splits["train"].paths[:64], backbone.preprocess, engine, 1)  # converted, compiled

    def yardstick():
        """What the default run computes: train/ once, valid/ and test/ with their mirrors."""
        pass_over(splits["train"].paths, backbone.preprocess, engine, 1)
        pass_over(splits["valid"].paths + splits["test"].paths, backbone.preprocess,
                  lambda images: (engine(images), engine(images.flip(3))), 1)

    images = len(splits["train"].paths) + 2 * (len(splits["valid"].paths)
                                                + len(splits["test"].paths))
    plain = row("OpenVINO pass: train/, valid/ and test/ with mirrors", seconds(yardstick)[1],
                images)
    settings = {"default": []} | {flags: shlex.split(flags) for flags in args.flags}
    if args.keep:
        Path(args.keep).mkdir(parents=True)  # a new folder: no earlier run's cache mixes in
    with (contextlib.nullcontext(args.keep) if args.keep
          else tempfile.TemporaryDirectory()) as folder:
        work = Path(folder)
        walls = {}
        for index, (name, flags) in enumerate(settings.items()):
            for state in ("cold", "warm"):
                wall, valid, test, log = train_run(args.data_dir, work, str(index), flags,
                                                   args.cpu)
                walls[state, name] = row(f"train.py {state} {name}", wall, note=(
                    f"{wall / plain:.2f}x the pass  valid {valid:.2%}  test {test:.2%}"))
                if args.show_log:
                    print(log)
    cold = walls["cold", "default"]
    for issue, goal in (("22", 4), ("31", 2.5)):
        print(f"issue {issue}: cold default / the pass  {cold / plain:.2f}x  goal <= {goal}x  "
              f"{'met' if cold <= goal * plain else 'NOT met'}")
    for (state, name), wall in walls.items():
        if state == "warm" and "--train_stages 0" in name:
            print(f"issue 22: warm {name}  {wall:.1f} s  goal <= 12 s  "
                  f"{'met' if wall <= 12 else 'NOT met'}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
