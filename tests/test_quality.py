"""Issue 11: the unknown verdict, calibrated probabilities, mirror-averaged features."""
import json
import re
from dataclasses import replace

import pytest
import torch
from PIL import ImageOps

from conftest import FLOWERS, require_shared_data, run_command
from flower_classifier.data.folders import find_splits
from flower_classifier.data.images import load_image
from flower_classifier.data.transforms import eval_transform
from flower_classifier.inference.predictor import Predictor
from flower_classifier.models.backbones import DEFAULT_ARCH, build_backbone
from flower_classifier.models.calibration import (
    TEMPERATURE_RANGE,
    class_means,
    expected_calibration_error,
    fit_temperature,
    nearest_similarity,
    pass_threshold,
)
from flower_classifier.models.checkpoint import (
    OPTIONAL_KEYS,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from flower_classifier.models.features import FeatureExtractor
from flower_classifier.models.stages import StageModel, split_backbone
from flower_classifier.training.tasks.base import training_autocast

CPU = torch.device("cpu")
JSON_KEYS = {"path", "classes", "names", "probabilities", "known"}


def sampled_labels(logits, generator):
    return torch.multinomial(logits.softmax(1), 1, generator=generator).flatten()


def test_temperature_recovers_how_overconfident_the_logits_are():
    generator = torch.Generator().manual_seed(0)
    honest = torch.randn(4000, 10, generator=generator) * 3
    labels = sampled_labels(honest, generator)  # softmax(honest) is calibrated by construction
    overconfident = honest * 2.5
    assert fit_temperature(overconfident, labels) == pytest.approx(2.5, rel=0.1)
    before = expected_calibration_error(overconfident.softmax(1), labels)
    after = expected_calibration_error((overconfident / 2.5).softmax(1), labels)
    assert before > 0.1 and after < 0.03
    always_right = torch.eye(10)[labels]  # the NLL falls forever as T shrinks
    assert fit_temperature(always_right, labels) == TEMPERATURE_RANGE[0]
    # A fine-tuned head's logits on 9 valid images, all right: LBFGS once drove T to 0 (NaN).
    few_right = torch.tensor([
        [0.86627257, -0.55230689, -0.31971323], [0.79134965, -0.40387008, -0.31472838],
        [0.88909727, -0.38159284, -0.35659105], [-0.24021375, 0.84043235, -0.67514652],
        [-0.05879459, 0.85652989, -0.75999421], [0.10053987, 0.75563502, -0.70030195],
        [-0.34439927, -0.70504957, 1.40120280], [-0.19887391, -0.37754121, 0.66218626],
        [-0.48105305, -0.44794255, 1.07268679]])
    assert fit_temperature(few_right, torch.arange(3).repeat_interleave(3)) == TEMPERATURE_RANGE[0]


def test_calibration_error_of_known_cases():
    labels = torch.tensor([0, 0, 0, 0])
    always_right_and_sure = torch.tensor([[1.0, 0.0]] * 4)
    assert expected_calibration_error(always_right_and_sure, labels) == pytest.approx(0)
    # 90% confident, right half the time: 0.4 off.
    half_right = torch.tensor([[0.9, 0.1], [0.1, 0.9]] * 2)
    assert expected_calibration_error(half_right, labels) == pytest.approx(0.4)


def test_threshold_lets_the_chosen_share_through_and_flags_far_features():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 64, generator=generator)
    labels = torch.arange(500) % 5
    features = centres[labels] + 0.3 * torch.randn(500, 64, generator=generator)
    means = class_means(features, labels, 5)
    assert torch.allclose(means.norm(dim=1), torch.ones(5))
    fresh = centres[labels] + 0.3 * torch.randn(500, 64, generator=generator)
    threshold = pass_threshold(nearest_similarity(fresh, means), pass_rate=0.95)
    assert (nearest_similarity(fresh, means) >= threshold).float().mean() == pytest.approx(0.95,
                                                                                          abs=0.01)
    strangers = torch.randn(200, 64, generator=generator)  # near none of the class means
    assert (nearest_similarity(strangers, means) < threshold).all()


NOT_FLOWERS = FLOWERS.parent / "not_flowers"


@pytest.fixture(scope="module")
def not_flowers(tmp_path_factory):
    """Symlinks to two photos of each of the 9 non-flower classes."""
    require_shared_data()
    folder = tmp_path_factory.mktemp("not_flowers")
    for group in sorted(NOT_FLOWERS.iterdir()):
        for image in sorted(group.iterdir())[:2]:
            (folder / f"{group.name}_{image.name}").symlink_to(image)
    return folder


def json_rows(*args):
    result = run_command("predict.py", *args, "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_unknown_verdict_flags_non_flowers_and_passes_flowers(trained, subset, not_flowers):
    _, run = trained
    checkpoint = load_checkpoint(run / "checkpoint.pth")
    assert checkpoint["class_means"].dtype == torch.float16
    assert checkpoint["class_means"].shape == (3, 1280)
    assert checkpoint["mirror"] is True and checkpoint["temperature"] > 0
    strangers = json_rows(not_flowers, run / "checkpoint.pth")
    assert len(strangers) == 18 and all(set(row) == JSON_KEYS for row in strangers)
    assert sum(not row["known"] for row in strangers) >= 0.9 * len(strangers)
    flowers = json_rows(subset / "test", run / "checkpoint.pth")
    # With 8 training images a class and 9 valid images the threshold is about the lowest
    # valid similarity, so a few test flowers fall below it (benchmarks/quality.py measures the
    # full data: about 5%).
    assert sum(row["known"] for row in flowers) >= 0.75 * len(flowers)
    # The text output says so, and names the closest class.
    stranger = sorted(not_flowers.iterdir())[0]
    verdict = run_command("predict.py", stranger, run / "checkpoint.pth")
    assert re.fullmatch(r"not one of the known classes \(closest: \S+ [\d.]+%\)\n",
                        verdict.stdout), verdict.stdout


def test_unknown_threshold_flag_and_switching_it_off(trained, not_flowers):
    _, run = trained
    everything_known = json_rows(not_flowers, run / "checkpoint.pth", "--unknown_threshold", "-1")
    assert all(row["known"] for row in everything_known)
    off = json_rows(not_flowers, run / "checkpoint.pth", "--no_unknown")
    assert all(list(row) == ["path", "classes", "names", "probabilities"] for row in off)
    bad = run_command("predict.py", not_flowers, run / "checkpoint.pth", "--unknown_threshold", "2")
    assert bad.returncode == 2 and "[-1, 1]" in bad.stderr


def test_checkpoint_without_the_new_keys_still_predicts(trained, subset, tmp_path):
    _, run = trained
    checkpoint = load_checkpoint(run / "checkpoint.pth")
    for key in OPTIONAL_KEYS:
        checkpoint.pop(key, None)  # "split" only where a folder was split automatically
    save_checkpoint(checkpoint, tmp_path / "old.pth")
    image = sorted((subset / "test" / "2").iterdir())[0]
    old = Predictor(tmp_path / "old.pth").predict_image(image, top_k=3)
    assert old.known is None and list(old.as_json()) == ["path", "classes", "names",
                                                         "probabilities"]
    assert old.classes[0] == "2"
    given = run_command("predict.py", image, tmp_path / "old.pth", "--unknown_threshold", "0.5")
    assert given.returncode == 2 and "no unknown verdict" in given.stderr


def hand_ece(probabilities, labels, bins=15):
    """The expected calibration error written out: images in `bins` equal-width confidence
    bins (b/bins, (b+1)/bins], each bin's |accuracy - mean confidence| weighted by its share."""
    confidence, predicted = probabilities.max(dim=1)
    total = 0.0
    for index in range(bins):
        inside = (confidence > index / bins) & (confidence <= (index + 1) / bins)
        if inside.any():
            accuracy = (predicted[inside] == labels[inside]).float().mean().item()
            total += inside.float().mean().item() * abs(accuracy - confidence[inside].mean().item())
    return total


def run_test_outputs(data, cache_dir, checkpoint):
    """(logits, features, labels) of the readable test/ images exactly as the default run saw
    them: its cached activations of each image and its mirror image (read back from its cache),
    through its trained stages and head, the views averaged as --mirror predict does; logits in
    float32 as evaluation computes them, features under training's autocast as the unknown
    verdict's are."""
    splits = find_splits(data)[1]
    backbone = build_backbone(checkpoint["arch"])
    stages = checkpoint["hyperparameters"]["train_stages"]
    extractor = FeatureExtractor(backbone, CPU, cache_dir=cache_dir, workers=0,
                                 images=sum(len(split.paths) for split in splits.values()),
                                 bottom=split_backbone(backbone, stages)[0], trained_stages=stages)
    test = splits["test"]
    activations, ok = extractor.features(test.root, test.paths,
                                         eval_transform(backbone.preprocess), mirror=True)
    assert extractor.computed == 0, "the run's test activations are not in its cache"
    classifier = model_from_checkpoint(checkpoint)
    trained_top = split_backbone(replace(backbone, model=classifier.backbone), stages)[1]
    model = StageModel(trained_top, classifier.head).eval()
    inputs = activations[ok].float()
    with torch.no_grad():
        logits = model(inputs)
        with training_autocast(CPU):
            features = model.features(inputs).float()
    return logits, features, torch.tensor(test.labels)[ok]


def test_test_report_calibration_is_that_of_the_test_images(trained, subset):
    _, run = trained
    report = json.loads((run / "test_report.json").read_text())
    calibration = report["calibration"]
    checkpoint = load_checkpoint(run / "checkpoint.pth")
    assert checkpoint["hyperparameters"]["train_stages"] == 2  # the default run
    logits, features, labels = run_test_outputs(subset, run.parent / "cache", checkpoint)
    assert len(labels) == report["images"]
    temperature = checkpoint["temperature"]
    before = hand_ece(logits.softmax(1), labels)
    after = hand_ece((logits / temperature).softmax(1), labels)
    assert abs(before - after) > 0.01  # here the temperature matters: leaving it out would show
    assert calibration["temperature"] == pytest.approx(temperature)
    assert calibration["ece_bins"] == 15
    assert calibration["ece_before"] == pytest.approx(before, abs=1e-6)
    assert calibration["ece_after"] == pytest.approx(after, abs=1e-6)
    # The unknown verdict's share: cosine similarity to the nearest class mean, by hand.
    unit = features / features.norm(dim=1, keepdim=True)
    means = checkpoint["class_means"].float()
    nearest = (unit @ (means / means.norm(dim=1, keepdim=True)).T).max(dim=1).values
    flagged = (nearest < checkpoint["unknown_threshold"]).float().mean().item()
    assert calibration["flagged_unknown"] == pytest.approx(flagged)


def test_mirror_features_average_the_image_and_its_mirror(tmp_path):
    require_shared_data()
    # A square image: the centre crop of its mirror is exactly the mirror of its centre crop.
    photo = load_image(sorted((FLOWERS / "train" / "1").iterdir())[0]).resize((256, 256))
    photo.save(tmp_path / "photo.png")
    ImageOps.mirror(photo).save(tmp_path / "mirror.png")
    backbone = build_backbone(DEFAULT_ARCH)
    transform = eval_transform(backbone.preprocess)
    paths = [str(tmp_path / "photo.png"), str(tmp_path / "mirror.png")]
    extractor = FeatureExtractor(backbone, CPU, workers=0, engine="torch")
    plain, _ = extractor.features(tmp_path, paths, transform)
    averaged, ok = extractor.features(tmp_path, paths[:1], transform, mirror=True)
    assert ok.all()
    expected = (plain[0].float() + plain[1].float()) / 2
    assert torch.allclose(averaged[0].float(), expected, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(plain[0].float(), expected, atol=2e-2, rtol=1e-2)
