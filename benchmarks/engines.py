"""CPU inference engines and phone-size photos: the figures behind engines.py and issue 12.

    python benchmarks/engines.py ../shared/data/flowers102                 # all (~10 min, 2 cores)
    python benchmarks/engines.py ../shared/data/flowers102 --skip_training # engines and photos only

All rows come from one run (the CPU may be shared: compare rows of one run, not across runs):
  model only   each engine on batches of 64 (img/s); OpenVINO's conversion, and its reading and
               compiling of the converted model (kept in the default cache, as train.py and
               predict.py keep it: the train.py and predict.py rows below find it there)
  decoding     12-MP JPEGs decoded in full and with draft (DCT-scaled) decoding, one process
  end to end   decoding + model over every other valid/ image, each engine, with 1 and 2
               decoding workers
  plain pass   OpenVINO over train+valid+test (converted model from disk, 1 worker as train.py's
               default): the yardstick of train.py's goal
  train.py     cold (empty feature cache, in a temp folder) with --engine auto, then warm (same
               cache: the same command again, and other head settings), and last cold with
               --engine torch and the head's bf16 training off (the float32 reference): seconds,
               valid and test accuracy
  predict.py   a folder of test photos at 256 px and the same upscaled to a shorter side of 3024
               (aspect kept; 12 MP at 4:3; JPEGs in a temp folder): seconds and the share of equal top answers; one image against
               `python -c "import torch, torchvision"` (best of 3 each)
then issue 12's goals, each marked met or NOT met.
"""
import argparse
import compileall
import functools
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from flower_classifier.cli.options import positive_int
from flower_classifier.data.folders import find_splits, list_images
from flower_classifier.data.images import load_image
from flower_classifier.data.loading import ImageFiles, image_loader
from flower_classifier.data.transforms import eval_transform
from flower_classifier.models import engines
from flower_classifier.models.backbones import DEFAULT_ARCH, build_backbone

CPU = torch.device("cpu")
PHONE_SHORT_SIDE = 3024  # 4032 x 3024 for a 4:3 photo: 12 MP
WARM_HEAD = ["--hidden_units", "256", "--learning_rate", "0.002"]


def seconds(function, *args, **kwargs):
    """(result, wall seconds) of one call."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def row(name, wall, images=None, note=""):
    rate = f"{images / wall:8.1f} img/s" if images else " " * 14
    print(f"{name:<44}{wall:8.2f} s {rate}  {note}", flush=True)
    return wall


def engine_of(backbone, name):
    """The engine train.py and predict.py would build, converted models in the default cache."""
    weights = engines.weights_key(backbone.name, backbone.weights, backbone.model.state_dict())
    return engines.compile_backbone(backbone.model, backbone.preprocess.crop, CPU, name,
                                    weights=weights)


def model_rows(backbone):
    """img/s of each engine on batches of 64, and what OpenVINO's start costs."""
    crop = backbone.preprocess.crop
    _, convert = seconds(engines.convert_to_openvino, backbone.model, crop)
    row("openvino: convert (torch.export + frontend)", convert)
    batch = torch.randn(64, 3, crop, crop)
    engine_of(backbone, "openvino")(batch)  # the converted model is on disk from here on
    fresh = engine_of(backbone, "openvino")
    row("openvino: read converted model + compile", seconds(fresh.compile)[1])
    f32 = engine_of(backbone, "openvino")
    f32.precision = "f32"  # forced, for comparison
    reference = engine_of(backbone, "torch")(batch)
    for engine in (engine_of(backbone, "torch"), fresh, f32):
        engine(batch)  # warm-up
        _, wall = seconds(lambda: [engine(batch) for _ in range(3)])
        error = (engine(batch) - reference).abs().max().item()
        row(f"model only: {engine.name} {engine.precision}", wall, 3 * len(batch),
            f"max |difference| to torch fp32 {error:.3f}")


def pass_over(paths, preprocess, engine, workers, draft=True):
    """Decode and run the engine over paths as the feature extractor does."""
    dataset = ImageFiles(paths, eval_transform(preprocess), preprocess.crop,
                         draft=preprocess.resize if draft else None)
    for images, _, _ in image_loader(dataset, 64, workers, CPU):
        engine(images)


def decoding_rows(photos, preprocess):
    """12-MP JPEGs per second in one process, decoded in full and drafted."""
    for draft in (None, preprocess.resize):
        _, wall = seconds(lambda: [load_image(path, draft) for path in photos])
        row(f"decode 12-MP JPEG {'drafted' if draft else 'in full'}", wall, len(photos))


def end_to_end_rows(splits, backbone):
    valid = splits["valid"].paths[::2]
    for name in ("torch", "openvino"):
        engine = engine_of(backbone, name)
        for workers in (1, 2):
            _, wall = seconds(pass_over, valid, backbone.preprocess, engine, workers)
            row(f"end to end valid/2: {name}, {workers} workers", wall, len(valid))


@functools.cache
def compile_bytecode():
    """The byte-code of the project and its packages, written once, as pip install leaves it
    for users: installed with --no-compile (as .ci/run installs them) where
    PYTHONDONTWRITEBYTECODE is set, as on these machines, every command timed here compiled
    all it imported first, seconds users do not spend (benchmarks/README.md, "Whole runs per
    CPU class")."""
    for folder in (PROJECT / "flower_classifier", sysconfig.get_path("purelib")):
        compileall.compile_dir(folder, quiet=2, workers=0)


def run(*arguments):
    """(stdout, wall seconds) of a project script run as a user would (its byte-code written
    beforehand: compile_bytecode)."""
    compile_bytecode()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *map(str, arguments)], cwd=PROJECT, text=True,
                          capture_output=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{arguments[0]} failed:\n{done.stderr[-2000:]}")
    return done.stdout, wall


# train.py with bf16 off where the CPU has it natively (the head then trains in float32 too):
# with --engine torch, the float32 reference of every step.
FLOAT32_TRAIN = ("import runpy, sys, engines; engines.cpu_has_native_bf16 = lambda: False; "
                 "sys.argv[0] = 'train.py'; runpy.run_path('train.py', run_name='__main__')")


def train_row(data_dir, work, engine):
    """A cold train.py run (its own empty feature cache): seconds, valid and test accuracy;
    --engine torch runs all in float32 (FLOAT32_TRAIN), the reference."""
    save_dir = work / f"run-{engine}"
    script = ("-c", FLOAT32_TRAIN) if engine == "torch" else ("train.py",)
    _, wall = run(*script, data_dir, "--save_dir", save_dir, "--cache_dir",
                  work / f"cache-{engine}", "--engine", engine)
    checkpoint = torch.load(save_dir / "checkpoint.pth", weights_only=True)
    valid = checkpoint["metrics"]["valid_accuracy"]
    test = json.loads((save_dir / "test_report.json").read_text())["accuracy"]
    name = "torch, all float32" if engine == "torch" else engine
    row(f"train.py cold --engine {name}", wall, note=f"valid {valid:.2%}  test {test:.2%}")
    return {"wall": wall, "valid": valid, "test": test}


def warm_rows(data_dir, work):
    """train.py again on the cold run's cache: the same command, then other head settings."""
    walls = {}
    for name, flags in (("same", []), ("other", WARM_HEAD)):
        _, wall = run("train.py", data_dir, "--save_dir", work / f"run-warm-{name}", "--cache_dir",
                      work / "cache-auto", *flags)
        what = "other head settings" if flags else "the same command"
        walls[name] = row(f"train.py warm ({what})", wall)
    return walls


def make_phone_photos(paths, folder):
    """The photos upscaled to a phone's size (shorter side 3024, aspect kept: 12 MP at 4:3),
    saved as a phone would (JPEG quality 90)."""
    for path in paths:
        target = folder / Path(path).parent.name / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        image = load_image(path)
        scale = PHONE_SHORT_SIDE / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        image.resize(size, Image.Resampling.BICUBIC).save(target, quality=90)
    return list_images(folder)


def top_answers(output):
    return {Path(item["path"]).name: item["classes"][0]
            for item in map(json.loads, output.splitlines())}


def predict_rows(checkpoint, small_folder, phone_folder, one_image):
    small, small_wall = run("predict.py", small_folder, checkpoint, "--json")
    phone, phone_wall = run("predict.py", phone_folder, checkpoint, "--json")
    small, phone = top_answers(small), top_answers(phone)
    same = sum(phone[name] == answer for name, answer in small.items()) / len(small)
    row("predict.py folder, 256 px", small_wall, len(small))
    row("predict.py folder, 12 MP", phone_wall, len(phone), f"same top answer {same:.1%}")
    ones, imports = [], []
    for _ in range(3):  # alternated, best of 3: start-up times are the noisiest
        ones.append(run("predict.py", one_image, checkpoint)[1])
        imports.append(run("-c", "import torch, torchvision")[1])
    one_wall = row("predict.py one image (best of 3)", min(ones))
    import_wall = row('python -c "import torch, torchvision" (best of 3)', min(imports))
    return {"small": small_wall, "phone": phone_wall, "same": same, "one": one_wall,
            "import": import_wall}


def goal(name, value, target, met):
    print(f"  {name:<52}{value:>8}  goal {target:<10}{'met' if met else 'NOT met'}")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", help="flowers folder with train/, valid/ and test/")
    parser.add_argument("--photos", type=positive_int, default=165,
                        help="test photos for the 12-MP predict.py comparison")
    parser.add_argument("--skip_training", action="store_true",
                        help="no train.py runs (then --checkpoint is needed for predict.py)")
    parser.add_argument("--skip_reference", action="store_true",
                        help="no cold train.py --engine torch run (the slowest row)")
    parser.add_argument("--skip_engine_rows", action="store_true",
                        help="no model-only, decoding and end-to-end rows")
    parser.add_argument("--checkpoint", default=None, help="checkpoint for the predict.py rows "
                        "(default: the one the cold auto train.py run writes)")
    return parser


def main(args):
    _, splits = find_splits(args.data_dir)
    backbone = build_backbone(DEFAULT_ARCH)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        print(f"{'':<44}{'wall':>10} {'rate':>14}")
        if not args.skip_engine_rows:
            model_rows(backbone)
        step = max(1, len(splits["test"].paths) // args.photos)
        tests = splits["test"].paths[::step][:args.photos]
        small_folder = work / "photos-256"
        for path in tests:
            (small_folder / Path(path).parent.name).mkdir(parents=True, exist_ok=True)
            (small_folder / Path(path).parent.name / Path(path).name).symlink_to(
                Path(path).resolve())
        phones = make_phone_photos(tests, work / "photos-12mp")
        if not args.skip_engine_rows:
            decoding_rows(phones[:20], backbone.preprocess)
            end_to_end_rows(splits, backbone)
        trained = {}
        if not args.skip_training:
            everything = [path for split in splits.values() for path in split.paths]
            plain = row("plain OpenVINO pass, train+valid+test", seconds(
                pass_over, everything, backbone.preprocess, engine_of(backbone, "openvino"), 1)[1],
                len(everything))
            trained = {"auto": train_row(args.data_dir, work, "auto"),
                       "warm": warm_rows(args.data_dir, work)}
        checkpoint = args.checkpoint or work / "run-auto" / "checkpoint.pth"
        predicted = predict_rows(checkpoint, small_folder, work / "photos-12mp", tests[0])
        if not (args.skip_training or args.skip_reference):  # the slow fp32 reference last
            trained["torch"] = train_row(args.data_dir, work, "torch")
    print("issue 12 goals:")
    if trained:
        cold, warm = trained["auto"]["wall"], trained["warm"]
        goal("cold train.py / plain OpenVINO pass", f"{cold / plain:.2f}x", "<= 1.3x",
             cold <= 1.3 * plain)
        for name, wall in warm.items():
            goal(f"warm train.py ({name} head settings)", f"{wall:.1f} s", "<= 8 s", wall <= 8)
        for split in ("valid", "test") if "torch" in trained else ():
            change = 100 * (trained["auto"][split] - trained["torch"][split])
            goal(f"{split} accuracy auto - torch fp32", f"{change:+.2f}", "+-0.3 pt",
                 abs(change) <= 0.3)
    goal("predict.py 12 MP / 256 px", f"{predicted['phone'] / predicted['small']:.2f}x",
         "<= 1.5x", predicted["phone"] <= 1.5 * predicted["small"])
    goal("same top answers 12 MP vs 256 px", f"{predicted['same']:.1%}", ">= 97%",
         predicted["same"] >= 0.97)
    goal("one-image predict.py / import torch, torchvision",
         f"{predicted['one'] / predicted['import']:.2f}x", "<= 1.2x",
         predicted["one"] <= 1.2 * predicted["import"])


if __name__ == "__main__":
    main(get_args_parser().parse_args())
