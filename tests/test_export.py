"""export.py: a real checkpoint (trained for 2 epochs on 3 flower classes) exported to TorchScript
and ONNX gives predict.py's probabilities when run with no code of this project; the metadata
says how to use it; user errors are one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export
import train
from common import UserError
from conftest import FLOWERS as DATA
from conftest import require_shared_data
from data_utils import load_image
from predictor import Predictor

PROJECT_ROOT = Path(__file__).parents[1]
CLASSES = ["1", "10", "11"]                 # sorted as names: index order of the checkpoint
IMAGES_PER_SPLIT = {"train": 4, "valid": 2}
TOLERANCE = 1e-4



def split_images(split, name, count):
    return sorted((DATA / split / name).iterdir())[:count]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def checkpoint(workdir):
    """A real checkpoint from train.py on a tiny subset (symlinks to the real images)."""
    require_shared_data()
    data = workdir / "data"
    for split, count in IMAGES_PER_SPLIT.items():
        for name in CLASSES:
            (data / split / name).mkdir(parents=True)
            for image in split_images(split, name, count):
                (data / split / name / image.name).symlink_to(image)
    out = workdir / "run"
    train.main(train.get_args_parser().parse_args(
        [str(data), "--save_dir", str(out), "--epochs", "2", "--cache_dir",
         str(workdir / "cache"), "--workers", "0"]))
    return out / "checkpoint.pth"


@pytest.fixture(scope="module")
def test_images():
    """4 real images the model never saw, from all 3 classes."""
    require_shared_data()
    return [str(path) for name, count in zip(CLASSES, (2, 1, 1))
            for path in split_images("test", name, count)]


@pytest.fixture(scope="module")
def expected(checkpoint, test_images):
    """predict.py's probabilities for test_images, [4, 3] in class index order, through torch
    in fp32 as the exported model computes (auto may take OpenVINO's bf16: engines.py)."""
    predictor = Predictor(checkpoint, engine="torch")
    assert predictor.classes == CLASSES
    rows = []
    for path in test_images:
        prediction = predictor.predict_image(path, top_k=len(CLASSES))
        rows.append([prediction.probabilities[prediction.classes.index(name)]
                     for name in CLASSES])
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def batch(checkpoint, test_images):
    """test_images preprocessed as predict.py does: the exported model's input."""
    transform = Predictor(checkpoint).transform
    return torch.stack([transform(load_image(path)) for path in test_images])


@pytest.fixture(scope="module")
def names_file(workdir):
    path = workdir / "names.json"
    path.write_text(json.dumps({"1": "pink primrose", "10": "globe thistle"}))  # no "11"
    return path


@pytest.fixture(scope="module")
def torchscript_export(workdir, checkpoint, names_file, test_images):
    """export.py --format torchscript with --category_names and --check on the test images."""
    check_dir = workdir / "check"
    check_dir.mkdir()
    for index, path in enumerate(test_images):
        (check_dir / f"{index}.jpg").symlink_to(path)
    output = workdir / "exported" / "flowers.pt"   # the folder is created
    result = export.main(export.get_args_parser().parse_args(
        [str(checkpoint), "--output", str(output), "--category_names", str(names_file),
         "--check", str(check_dir)]))
    return output, result


PLAIN_TORCH_RUN = """
import json, sys, torch
model = torch.jit.load(sys.argv[1])
images = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    probabilities = model(images)
ours = {"export", "predict", "predictor", "model_utils", "backbones", "data_utils", "cli_utils",
        "common", "features", "train", "timm"}
print(json.dumps({"probabilities": probabilities.tolist(), "dtype": str(probabilities.dtype),
                  "imported": sorted(ours & set(sys.modules)), "path": sys.path}))
"""


def test_torchscript_runs_with_plain_torch_and_matches_predict(torchscript_export, batch,
                                                               expected, checkpoint, workdir):
    output, result = torchscript_export
    assert result["output"] == str(output) and output.is_file()
    assert result["metadata"] == str(output.with_suffix(".json"))
    images_file = workdir / "images.pt"
    torch.save(batch, images_file)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", PLAIN_TORCH_RUN, str(output), str(images_file)],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["imported"] == []
    assert str(PROJECT_ROOT) not in answer["path"]
    probabilities = torch.tensor(answer["probabilities"])
    assert answer["dtype"] == "torch.float32"
    assert probabilities.shape == (4, len(CLASSES))       # traced with a batch of 2, run with 4
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(4), atol=1e-5)
    assert (probabilities - expected).abs().max().item() < TOLERANCE

    metadata = json.loads(output.with_suffix(".json").read_text())
    saved = torch.load(checkpoint, weights_only=True)
    assert metadata["classes"] == CLASSES
    assert metadata["preprocess"] == saved["preprocess"]
    assert metadata["format"] == "torchscript" and metadata["arch"] == saved["arch"]
    assert metadata["output"] == "probabilities [N, 3]"
    crop, resize = saved["preprocess"]["crop"], saved["preprocess"]["resize"]
    assert metadata["input"].startswith(f"float32 [N, 3, {crop}, {crop}], RGB")
    assert f"shorter side is {resize}" in metadata["input"]
    assert not list(output.parent.glob(".*.tmp"))          # atomic writes left nothing behind


def test_check_flag_reports_parity_with_predict(torchscript_export):
    _, result = torchscript_export
    assert 0 <= result["max_difference"] < TOLERANCE


def test_category_names_go_into_the_metadata(torchscript_export, checkpoint):
    output, _ = torchscript_export
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert metadata["classes"] == CLASSES
    assert metadata["names"] == ["pink primrose", "globe thistle", "11"]  # "11" has no name
    plain = export.export_metadata(torch.load(checkpoint, weights_only=True), "onnx")
    assert plain["names"] == CLASSES and plain["format"] == "onnx"


def test_onnx_runs_with_onnxruntime_and_matches_predict(workdir, checkpoint, batch, expected,
                                                        test_images, capsys):
    import onnxruntime  # in requirements-test.txt: CI runs this test, never skips it
    output = workdir / "onnx" / "flowers.onnx"
    result = export.main(export.get_args_parser().parse_args(
        [str(checkpoint), "--format", "onnx", "--output", str(output), "--check",
         test_images[0]]))
    assert result["max_difference"] < TOLERANCE
    assert "largest difference" in capsys.readouterr().out
    assert sorted(path.name for path in output.parent.iterdir()) == ["flowers.json",
                                                                     "flowers.onnx"]
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert [node.name for node in session.get_inputs()] == [metadata["input_name"]]
    for rows in (slice(0, 1), slice(1, 4)):                    # dynamic batch: 1 and 3 images
        probabilities = torch.from_numpy(
            session.run(None, {metadata["input_name"]: batch[rows].numpy()})[0])
        assert probabilities.shape == (rows.stop - rows.start, len(CLASSES))
        assert torch.allclose(probabilities.sum(dim=1), torch.ones(len(probabilities)),
                              atol=1e-5)
        assert (probabilities - expected[rows]).abs().max().item() < TOLERANCE
    assert metadata["classes"] == CLASSES and metadata["names"] == CLASSES
    assert metadata["format"] == "onnx"


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    run = subprocess.run([sys.executable, str(PROJECT_ROOT / "export.py"), "missing.pth"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.pth" in lines[0]
    assert not list(tmp_path.iterdir())                       # nothing written


def test_user_errors_before_any_work(tmp_path, checkpoint):
    def run(*argv):
        return export.main(export.get_args_parser().parse_args([str(checkpoint), *argv]))

    with pytest.raises(UserError, match="not found"):
        run("--check", str(tmp_path / "no_such_image.jpg"))
    with pytest.raises(UserError, match="holds no images"):
        run("--check", str(tmp_path))
    with pytest.raises(UserError, match="metadata"):
        run("--output", str(tmp_path / "model.json"))
    with pytest.raises(UserError, match="category names file"):
        run("--category_names", str(tmp_path / "names.json"))
    junk = tmp_path / "junk.pth"
    junk.write_text("junk\n")
    with pytest.raises(UserError, match="damaged or not a checkpoint"):
        export.main(export.get_args_parser().parse_args([str(junk)]))
    junk.unlink()
    assert not list(tmp_path.iterdir())


def test_default_output_is_beside_the_checkpoint():
    assert export.output_paths("runs/checkpoint.pth", "onnx", None) == (
        Path("runs/checkpoint.onnx"), Path("runs/checkpoint.json"))
    assert export.output_paths("c.pth", "torchscript", "out/model.v2.pt") == (
        Path("out/model.v2.pt"), Path("out/model.v2.json"))
