"""export.py: a real checkpoint (trained for 2 epochs on 3 flower classes) exported to TorchScript
and ONNX takes uint8 pixels as an app has them and gives predict.py's probabilities and unknown
verdict with no code of this project; the check catches a wrong model; user errors are one line
and exit 2, leaving nothing behind. The phone formats: test_export_phone.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import export
import train
from conftest import CIFAR, make_subset, run_command, train_args
from conftest import EXPORT_CLASSES as CLASSES
from flower_classifier.data.images import load_image
from flower_classifier.export.app_model import app_pixels
from flower_classifier.export.check import parity_check, verify
from flower_classifier.export.metadata import export_metadata
from flower_classifier.export.run import output_paths
from flower_classifier.inference.predictor import Predictor
from flower_classifier.models.checkpoint import load_checkpoint, save_checkpoint
from flower_classifier.utils.errors import UserError

PROJECT_ROOT = Path(__file__).parents[1]
TOLERANCE = 1e-4


def one_line_exit_2(run):
    """A user error as the house rules want it: exit code 2 and one line, no traceback."""
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


def run_export(*argv, cwd=PROJECT_ROOT, python=sys.executable):
    return subprocess.run([python, str(PROJECT_ROOT / "export.py"), *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def data(export_data):
    return export_data


@pytest.fixture(scope="module")
def checkpoint(export_checkpoint):
    return export_checkpoint


@pytest.fixture(scope="module")
def test_images(data):
    """6 real images the model never saw, from all 3 classes."""
    return sorted(str(path) for path in (data / "test").rglob("*.jpg"))


@pytest.fixture(scope="module")
def expected(checkpoint, test_images):
    """predict.py's (probabilities [6, 3] in class index order, known [6]) for test_images,
    through torch in fp32 as the exported model computes."""
    predictor = Predictor(checkpoint, engine="torch")
    assert predictor.classes == CLASSES and predictor.unknown_threshold is not None
    rows, known = [], []
    for path in test_images:
        prediction = predictor.predict_image(path, top_k=len(CLASSES))
        rows.append([prediction.probabilities[prediction.classes.index(name)]
                     for name in CLASSES])
        known.append(prediction.known)
    return torch.tensor(rows), torch.tensor(known)


@pytest.fixture(scope="module")
def pixels(checkpoint, test_images):
    """test_images as an app feeds them: the centre crop, uint8 [6, crop, crop, 3]."""
    preprocess = Predictor(checkpoint).preprocess
    return np.stack([app_pixels(load_image(path), preprocess) for path in test_images])


@pytest.fixture(scope="module")
def names_file(workdir):
    path = workdir / "names.json"
    path.write_text(json.dumps({"1": "pink primrose", "10": "globe thistle"}))  # no "11"
    return path


@pytest.fixture(scope="module")
def torchscript_export(workdir, checkpoint, names_file, data):
    """export.py --format torchscript with --category_names and --check on the test folder."""
    output = workdir / "exported" / "flowers.pt"   # the folder is created
    result = export.main(export.get_args_parser().parse_args(
        [str(checkpoint), "--output", str(output), "--category_names", str(names_file),
         "--check", str(data / "test")]))
    return output, result


PLAIN_TORCH_RUN = """
import json, sys, numpy, torch
files = {"classifier.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=files)
pixels = torch.from_numpy(numpy.load(sys.argv[2]))
with torch.no_grad():
    probabilities, similarity = model(pixels)
ours = {"flower_classifier", "export", "predict", "model_utils", "data_utils", "train", "timm"}
print(json.dumps({"probabilities": probabilities.tolist(), "similarity": similarity.tolist(),
                  "dtype": str(probabilities.dtype), "metadata": json.loads(files["classifier.json"]),
                  "imported": sorted(name for name in sys.modules if name.split(".")[0] in ours), "path": sys.path}))
"""


def test_torchscript_takes_uint8_pixels_and_gives_predicts_answers(
        torchscript_export, pixels, expected, checkpoint, workdir):
    output, result = torchscript_export
    assert result["output"] == str(output) and output.is_file()
    assert result["metadata"] == str(output.with_suffix(".json"))
    pixels_file = workdir / "pixels.npy"
    np.save(pixels_file, pixels)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", PLAIN_TORCH_RUN, str(output), str(pixels_file)],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["imported"] == []
    assert str(PROJECT_ROOT) not in answer["path"]
    probabilities = torch.tensor(answer["probabilities"])
    assert answer["dtype"] == "torch.float32"
    assert probabilities.shape == (6, len(CLASSES))       # traced with a batch of 2, run with 6
    assert (probabilities - expected[0]).abs().max().item() < TOLERANCE
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert answer["metadata"] == metadata                 # inside the file too
    known = torch.tensor(answer["similarity"]) >= metadata["unknown_threshold"]
    assert known.tolist() == expected[1].tolist()

    saved = load_checkpoint(checkpoint)
    assert metadata["classes"] == CLASSES
    assert metadata["preprocess"] == saved["preprocess"]
    assert metadata["unknown_threshold"] == pytest.approx(float(saved["unknown_threshold"]))
    assert metadata["temperature"] == pytest.approx(float(saved["temperature"]))
    assert metadata["format"] == "torchscript" and metadata["arch"] == saved["arch"]
    assert metadata["output_names"] == ["probabilities", "similarity"]
    crop, resize = saved["preprocess"]["crop"], saved["preprocess"]["resize"]
    assert metadata["input"]["dtype"] == "uint8" and metadata["input"]["layout"] == "NHWC"
    assert metadata["input"]["shape"] == ["N", crop, crop, 3]
    assert f"shorter side resized to {resize}" in metadata["input"]["prepare"]
    assert not list(output.parent.glob(".*.tmp"))          # atomic writes left nothing behind


def test_check_flag_reports_parity_with_predict(torchscript_export):
    _, result = torchscript_export
    check = result["check"]
    assert check["images"] == 6 and check["top1_agreement"] == 1.0
    assert check["known_agreement"] == 1.0
    assert 0 <= check["max_difference"] < TOLERANCE


def test_category_names_go_into_the_metadata(torchscript_export, checkpoint):
    output, _ = torchscript_export
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert metadata["classes"] == CLASSES
    assert metadata["names"] == ["pink primrose", "globe thistle", "11"]  # "11" has no name
    plain = export_metadata(load_checkpoint(checkpoint), "onnx")
    assert plain["names"] == CLASSES and plain["format"] == "onnx"


def test_check_detects_a_wrong_model(workdir, checkpoint, test_images):
    """A model whose class rows are rotated gives every photo another top class: the check
    says so and fails, while the right model passes it."""
    wrong = load_checkpoint(checkpoint)
    last = max(key for key in wrong["head_state"] if key.endswith(".weight"))
    for key in (last, last.replace("weight", "bias")):
        wrong["head_state"][key] = wrong["head_state"][key].roll(1, dims=0)
    save_checkpoint(wrong, workdir / "wrong.pth")
    output = workdir / "wrong" / "wrong.pt"
    export.main(export.get_args_parser().parse_args([str(workdir / "wrong.pth"), "--output",
                                                     str(output)]))
    result = parity_check(output, "torchscript", checkpoint, test_images)
    assert result.top1_agreement == 0.0
    with pytest.raises(UserError, match="disagrees with predict.py"):
        verify(result, "float32")
    right = parity_check(workdir / "exported" / "flowers.pt", "torchscript", checkpoint,
                                test_images)
    verify(right, "float32")


def test_onnx_runs_with_onnxruntime_and_matches_predict(workdir, checkpoint, pixels, expected,
                                                        test_images, capsys):
    import onnx
    import onnxruntime  # in requirements-test.txt: CI runs this test, never skips it

    output = workdir / "onnx" / "flowers.onnx"
    result = export.main(export.get_args_parser().parse_args(
        [str(checkpoint), "--format", "onnx", "--output", str(output), "--check",
         test_images[0]]))
    assert result["check"]["max_difference"] < TOLERANCE
    assert "top-1 class agrees with predict.py on 100.0%" in capsys.readouterr().out
    assert sorted(path.name for path in output.parent.iterdir()) == ["flowers.json",
                                                                     "flowers.onnx"]
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert [node.name for node in session.get_inputs()] == [metadata["input"]["name"]]
    assert [node.name for node in session.get_outputs()] == metadata["output_names"]
    for rows in (slice(0, 1), slice(1, 6)):                    # dynamic batch: 1 and 5 images
        probabilities, similarity = session.run(
            None, {metadata["input"]["name"]: pixels[rows]})
        assert probabilities.shape == (rows.stop - rows.start, len(CLASSES))
        assert np.abs(probabilities - expected[0][rows].numpy()).max() < TOLERANCE
        assert ((similarity >= metadata["unknown_threshold"]).tolist()
                == expected[1][rows].tolist())
    props = {prop.key: prop.value for prop in onnx.load(str(output)).metadata_props}
    assert json.loads(props["classifier.json"]) == metadata
    assert metadata["classes"] == CLASSES and metadata["names"] == CLASSES


def train_cnn(root):
    """(checkpoint, data) of the small CNN trained from scratch (--arch cnn) for 2 epochs on a
    few CIFAR-10 photos."""
    data = make_subset(root / "data", ("airplane", "cat", "ship"),
                       {"train": 12, "valid": 4, "test": 4}, CIFAR)
    train.main(train_args(data, root / "run", root / "cache", "--arch", "cnn", "--epochs", "2",
                          "--batch_size", "16"))
    return root / "run" / "checkpoint.pth", data


@pytest.fixture(scope="module")
def cnn_checkpoint(tmp_path_factory):
    return train_cnn(tmp_path_factory.mktemp("cnn"))


def test_cnn_checkpoint_exports_and_matches_predict(cnn_checkpoint, tmp_path):
    checkpoint, data = cnn_checkpoint
    output = tmp_path / "cnn.onnx"
    result = export.main(export.get_args_parser().parse_args(
        [str(checkpoint), "--format", "onnx", "--output", str(output), "--check",
         str(data / "test")]))
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert metadata["arch"] == "cnn" and metadata["input"]["shape"] == ["N", 32, 32, 3]
    assert result["check"]["images"] == 12 and result["check"]["top1_agreement"] == 1.0
    assert result["check"]["max_difference"] < TOLERANCE
    with pytest.raises(UserError, match="int8 does not work for --arch cnn"):
        export.main(export.get_args_parser().parse_args(
            [str(checkpoint), "--format", "executorch", "--dtype", "int8", "--calibration",
             str(data / "train"), "--output", str(tmp_path / "cnn.pte")]))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cnn.json", "cnn.onnx"]


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    line = one_line_exit_2(run_command("export.py", "missing.pth", cwd=tmp_path))
    assert "missing.pth" in line
    assert not list(tmp_path.iterdir())                       # nothing written


def test_unknown_format_is_one_clear_line(tmp_path, checkpoint):
    line = one_line_exit_2(run_command("export.py", checkpoint, "--format", "tensorflow",
                                         cwd=tmp_path))
    assert "tensorflow" in line and "executorch" in line      # names the choices
    usage = run_command("export.py", "--help")
    assert usage.returncode == 0 and "99.5% of photos" in usage.stdout


def test_damaged_checkpoint_is_one_clear_line_and_writes_nothing(tmp_path, checkpoint):
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(checkpoint.read_bytes()[:100_000])    # cut short, as by a full disk
    line = one_line_exit_2(run_command("export.py", damaged, "--format", "executorch",
                                         cwd=tmp_path))
    assert "damaged" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["damaged.pth"]


MISSING_EXECUTORCH = """
import importlib.util, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *rest: None if name == "executorch" else find_spec(name, *rest)
sys.path.insert(0, sys.argv[1])
import export
from flower_classifier.cli.runner import run_cli
run_cli(export.main, export.get_args_parser(), sys.argv[2:])
"""


def test_missing_exporter_is_one_line_naming_the_install(tmp_path, checkpoint):
    """As on a machine without executorch: one line that says what to install, nothing
    written, before any work."""
    output = tmp_path / "out" / "model.pte"
    run = subprocess.run([sys.executable, "-c", MISSING_EXECUTORCH, str(PROJECT_ROOT),
                          str(checkpoint), "--format", "executorch", "--output", str(output)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    line = one_line_exit_2(run)
    assert "executorch" in line and "requirements-export.txt" in line
    assert not list(tmp_path.iterdir())


def test_exporter_failure_leaves_no_partial_file(tmp_path, checkpoint, monkeypatch):
    def half_written(model, args, path, **options):
        Path(path).write_bytes(b"\x08\x07half a model")
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", half_written)
    output = tmp_path / "model.onnx"
    with pytest.raises(UserError, match="ONNX exporter failed .unsupported operator"):
        export.main(export.get_args_parser().parse_args(
            [str(checkpoint), "--format", "onnx", "--output", str(output)]))
    assert not list(tmp_path.iterdir())


def test_user_errors_before_any_work(tmp_path, checkpoint):
    def run(*argv):
        return export.main(export.get_args_parser().parse_args([str(checkpoint), *argv]))

    beside_checkpoint = sorted(checkpoint.parent.iterdir())  # where the default output goes
    with pytest.raises(UserError, match="not found"):
        run("--check", str(tmp_path / "no_such_image.jpg"))
    with pytest.raises(UserError, match="holds no images"):
        run("--check", str(tmp_path))
    with pytest.raises(UserError, match="metadata"):
        run("--output", str(tmp_path / "model.json"))
    with pytest.raises(UserError, match="category names file"):
        run("--category_names", str(tmp_path / "names.json"))
    with pytest.raises(UserError, match="executorch only"):
        run("--format", "onnx", "--dtype", "int8", "--calibration", str(tmp_path))
    with pytest.raises(UserError, match="needs --calibration"):
        run("--format", "executorch", "--dtype", "int8")
    junk = tmp_path / "junk.pth"
    junk.write_text("junk\n")
    with pytest.raises(UserError, match="damaged or not a checkpoint"):
        export.main(export.get_args_parser().parse_args([str(junk)]))
    junk.unlink()
    assert not list(tmp_path.iterdir())
    assert sorted(checkpoint.parent.iterdir()) == beside_checkpoint


def test_default_output_is_beside_the_checkpoint():
    assert output_paths("runs/checkpoint.pth", "onnx", None) == (
        Path("runs/checkpoint.onnx"), Path("runs/checkpoint.json"))
    assert output_paths("runs/checkpoint.pth", "executorch", None)[0] == Path(
        "runs/checkpoint.pte")
    assert output_paths("runs/checkpoint.pth", "coreml", None)[0] == Path(
        "runs/checkpoint.mlpackage")
    assert output_paths("c.pth", "torchscript", "out/model.v2.pt") == (
        Path("out/model.v2.pt"), Path("out/model.v2.json"))


def test_quiet_stderr_drops_executorchs_noise_and_keeps_real_errors(capfd):
    """ExecuTorch's XNNPACK CPU probe writes five lines from C++ (file descriptor 2) and torch
    logs a register_constant() deprecation on importing its backend: dropped; anything else
    written there, from C or Python, is kept."""
    from flower_classifier.export.formats import quiet_stderr

    with quiet_stderr():
        os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n")
        os.write(2, b"E00:00:00.000 a real error from the runtime\n")
        print("W1206 _pytree.py:630] <enum 'KernelPreference'> is an Enum subclass ... "
              "Calling register_constant() on Enum subclasses is deprecated", file=sys.stderr)
        print("a Python warning that matters", file=sys.stderr)
    err = capfd.readouterr().err
    assert err == "E00:00:00.000 a real error from the runtime\na Python warning that matters\n"
