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
<= 12 s.
"""
import argparse
import contextlib
import importlib.util
import json
import shlex
import tempfile
from pathlib import Path

import torch

# benchmarks/engines.py's rows, under another name than the project's engines.py it imports.
_spec = importlib.util.spec_from_file_location("engine_rows", Path(__file__).with_name("engines.py"))
engine_rows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine_rows)
engine_of, pass_over, row, run, seconds = (engine_rows.engine_of, engine_rows.pass_over,
                                           engine_rows.row, engine_rows.run, engine_rows.seconds)
from flower_classifier.data.folders import find_splits
from flower_classifier.models.backbones import DEFAULT_ARCH, build_backbone


def train_run(data_dir, work, name, flags):
    """(wall seconds, valid accuracy, test accuracy, the log) of one train.py run."""
    save_dir = work / f"run-{name}"
    output, wall = run("train.py", data_dir, "--save_dir", save_dir, "--cache_dir",
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
    return parser


def main(args):
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
                wall, valid, test, log = train_run(args.data_dir, work, str(index), flags)
                walls[state, name] = row(f"train.py {state} {name}", wall, note=(
                    f"{wall / plain:.2f}x the pass  valid {valid:.2%}  test {test:.2%}"))
                if args.show_log:
                    print(log)
    print("issue 22 goals:")
    cold = walls["cold", "default"]
    print(f"  cold default / the pass  {cold / plain:.2f}x  goal <= 4x  "
          f"{'met' if cold <= 4 * plain else 'NOT met'}")
    for (state, name), wall in walls.items():
        if state == "warm" and "--train_stages 0" in name:
            print(f"  warm {name}  {wall:.1f} s  goal <= 12 s  {'met' if wall <= 12 else 'NOT met'}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
