"""export.py's phone formats, each run by its own runtime: ExecuTorch (float32 on the small CNN,
int8 on EfficientNet-Lite0), LiteRT and Core ML (its spec: Core ML cannot predict on Linux). Fed uint8 photos as an app feeds them,
each gives predict.py's answers; the labels and the threshold are inside the file.

ExecuTorch and Core ML come from requirements-export.txt (which requirements-test.txt includes:
CI runs these); LiteRT pins packages of its own and lives in its own environment (README), found
through $LITERT_PYTHON or .venv-litert/bin/python: without it its test is skipped, in CI failed."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import export
from conftest import run_command
from flower_classifier.export import formats
from flower_classifier.export.app_model import app_model
from flower_classifier.export.check import coreml_labels, parity_check
from flower_classifier.models.checkpoint import load_checkpoint
from test_export import CLASSES, TOLERANCE, run_export, train_cnn

PROJECT_ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export_phone")


@pytest.fixture(scope="module")
def data(export_data):
    return export_data


@pytest.fixture(scope="module")
def checkpoint(export_checkpoint):
    """EfficientNet-Lite0 with a head trained for 2 epochs on 3 classes: it has the unknown
    verdict, so the exports have the similarity output."""
    return export_checkpoint


@pytest.fixture(scope="module")
def names_file(workdir):
    path = workdir / "names.json"
    path.write_text(json.dumps({"1": "pink primrose", "10": "globe thistle", "11": "sweet pea"}))
    return path


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """The small CNN trained from scratch on a few CIFAR-10 photos: quick to export."""
    return train_cnn(tmp_path_factory.mktemp("cnn"))


@pytest.fixture(scope="module")
def executorch_export(workdir, cnn_run):
    """export.py --format executorch of the small CNN (EfficientNet-Lite0's float32 lowering
    takes about as long as its int8 one below), with --check on its test photos and display
    names."""
    checkpoint, data = cnn_run
    names = workdir / "cnn_names.json"
    names.write_text(json.dumps({"airplane": "aeroplane", "cat": "house cat", "ship": "boat"}))
    output = workdir / "pte" / "cnn.pte"
    result = export.main(export.get_args_parser().parse_args(
        [str(checkpoint), "--format", "executorch", "--output", str(output), "--check",
         str(data / "test"), "--category_names", str(names)]))
    return output, result


def test_executorch_gives_predicts_answers_with_labels_inside(executorch_export):
    from executorch.runtime import Runtime

    output, result = executorch_export
    check = result["check"]
    assert check["images"] == 12 and check["top1_agreement"] == 1.0
    assert check["max_difference"] < TOLERANCE
    assert check["known_agreement"] is None                 # the CNN has no unknown verdict

    metadata = json.loads(output.with_suffix(".json").read_text())
    assert metadata["input"]["shape"] == [1, 32, 32, 3] and metadata["input"]["dtype"] == "uint8"
    program = Runtime.get().load_program(str(output))
    assert program.method_names == {"forward", "class_names", "display_names", "metadata_json"}
    constant = {name: program.load_method(name).execute([])
                for name in ("class_names", "display_names")}
    assert constant["class_names"] == ["airplane", "cat", "ship"]
    assert constant["display_names"] == ["aeroplane", "house cat", "boat"]
    assert json.loads(program.load_method("metadata_json").execute([])[0]) == metadata
    (probabilities,) = program.load_method("forward").execute(
        [torch.zeros(1, 32, 32, 3, dtype=torch.uint8)])
    assert probabilities.shape == (1, 3)
    assert probabilities.sum().item() == pytest.approx(1, abs=1e-5)


@pytest.fixture(scope="module")
def int8_export(workdir, checkpoint, data, names_file):
    """export.py --dtype int8, calibrated on the training photos: the .pte, and the quantised
    graph formats.quantised_int8 made for it (one quantisation for the tests of both)."""
    output = workdir / "pte" / "int8.pte"
    quantised = []
    make_quantised = formats.quantised_int8

    def quantise_and_keep(*args):
        quantised.append(make_quantised(*args))
        return quantised[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(formats, "quantised_int8", quantise_and_keep)
        export.main(export.get_args_parser().parse_args(
            [str(checkpoint), "--format", "executorch", "--output", str(output), "--dtype",
             "int8", "--calibration", str(data / "train"), "--category_names",
             str(names_file)]))
    (graph,) = quantised
    return output, graph


def test_int8_executorch_is_a_quarter_the_size_and_close(int8_export, checkpoint, data):
    """--dtype int8: XNNPACK's quantiser, calibrated on the training photos; the file is about a
    quarter of the float32 weights and its probabilities stay near predict.py's. The labels,
    the threshold and the similarity output are inside, as in a float32 .pte."""
    from executorch.runtime import Runtime

    int8, _ = int8_export
    weights = app_model(load_checkpoint(checkpoint)).state_dict().values()
    float32_bytes = 4 * sum(tensor.numel() for tensor in weights)
    assert int8.stat().st_size < 0.35 * float32_bytes
    metadata = json.loads(int8.with_suffix(".json").read_text())
    assert metadata["dtype"] == "int8"
    photos = sorted(str(path) for path in (data / "test").rglob("*.jpg"))
    result = parity_check(int8, "executorch", checkpoint, photos)
    assert result.images == 6 and 0 < result.max_difference < 0.2

    program = Runtime.get().load_program(str(int8))
    constant = {name: program.load_method(name).execute([])
                for name in ("class_names", "display_names", "unknown_threshold")}
    assert constant["class_names"] == CLASSES
    assert constant["display_names"] == ["pink primrose", "globe thistle", "sweet pea"]
    assert constant["unknown_threshold"] == [pytest.approx(metadata["unknown_threshold"])]
    probabilities, similarity = program.load_method("forward").execute(
        [torch.zeros(1, 224, 224, 3, dtype=torch.uint8)])
    assert probabilities.shape == (1, 3) and similarity.shape == (1,)


def test_int8_fuses_each_relu6_into_its_convolution(int8_export):
    """export/int8_quantizer.py: no int8 step between a convolution and its ReLU6, whose output range is
    observed within [0, 6] (XNNPACK's quantiser alone observes the unclamped convolution's)."""
    from flower_classifier.export.int8_quantizer import is_relu6

    _, quantised = int8_export
    relu6s = [node for node in quantised.graph.nodes if is_relu6(node)]
    assert len(relu6s) == 33   # EfficientNet-Lite0: stem, head, blocks' expansions and depthwise
    for relu6 in relu6s:
        assert relu6.args[0].target == torch.ops.aten.conv2d.default
        (quantize,) = relu6.users
        _, scale, zero_point, lowest, highest, _ = quantize.args
        assert "quantize_per_tensor" in str(quantize.target)
        assert (lowest - zero_point) * scale == 0 and 0 < (highest - zero_point) * scale <= 6.01


def test_coreml_spec_has_image_input_labels_and_threshold(workdir, checkpoint, data, names_file):
    import coremltools as ct

    output = workdir / "coreml" / "flowers.mlpackage"
    run = run_command("export.py", checkpoint, "--format", "coreml", "--output", output,
                      "--check", data / "test", "--category_names", names_file)
    assert run.returncode == 0, run.stderr
    assert "Core ML cannot predict on Linux" in run.stdout and "3 labels" in run.stdout
    assert output.is_dir() and not list(output.parent.glob(".*"))   # renamed into place
    spec = ct.utils.load_spec(str(output))
    assert coreml_labels(spec) == ["pink primrose", "globe thistle", "sweet pea"]
    assert [output.name for output in spec.description.output] == [
        "classLabel", "classLabel_probs", "similarity"]
    image = spec.description.input[0].type.imageType
    assert (image.width, image.height) == (224, 224)
    user = spec.description.metadata.userDefined
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert json.loads(user["classifier.json"]) == metadata
    assert float(user["unknown_threshold"]) == pytest.approx(metadata["unknown_threshold"])


def litert_python():
    """The Python of LiteRT's own environment, or None."""
    candidate = os.environ.get("LITERT_PYTHON") or str(PROJECT_ROOT / ".venv-litert/bin/python")
    return candidate if Path(candidate).is_file() else None


LITERT_RUN = """
import json, sys
import numpy
sys.path.insert(0, sys.argv[1])
from ai_edge_litert.interpreter import Interpreter
from flower_classifier.export.formats import tflite_metadata
runner = Interpreter(model_path=sys.argv[2]).get_signature_runner()
(name,) = runner.get_input_details()
outputs = runner(**{name: numpy.zeros((1, 32, 32, 3), numpy.uint8)})
print(json.dumps({"metadata": tflite_metadata(sys.argv[2]),
                  "input": runner.get_input_details()[name]["dtype"].__name__,
                  "outputs": {key: value.tolist() for key, value in outputs.items()}}))
"""


def test_tflite_gives_predicts_answers_with_metadata_inside(cnn_run, tmp_path):
    python = litert_python()
    if python is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI needs LiteRT's environment .venv-litert (README: LiteRT)")
        pytest.skip("no LiteRT environment (.venv-litert or $LITERT_PYTHON)")
    checkpoint, data = cnn_run
    output = tmp_path / "cnn.tflite"
    run = run_export(checkpoint, "--format", "tflite", "--output", output, "--check",
                     data / "test", python=python)
    assert run.returncode == 0, run.stderr
    assert "on 12 photos fed as uint8: top-1 class agrees with predict.py on 100.0%" in run.stdout
    inside = subprocess.run([python, "-c", LITERT_RUN, str(PROJECT_ROOT), str(output)],
                            capture_output=True, text=True, timeout=300)
    assert inside.returncode == 0, inside.stderr
    answer = json.loads(inside.stdout)
    assert answer["metadata"] == json.loads(output.with_suffix(".json").read_text())
    assert answer["input"] == "uint8"
    (probabilities,) = answer["outputs"].values()          # the CNN has no unknown verdict
    assert np.array(probabilities).shape == (1, 3)
    assert sum(probabilities[0]) == pytest.approx(1, abs=1e-5)
