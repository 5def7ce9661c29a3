"""The from-scratch CNN and its in-memory small-image pipeline, on a few real CIFAR-10 images."""

import pytest
import torch
import torch.nn.functional as F

from conftest import CIFAR, make_subset, run_command, stopped_at_epoch, train_args
from flower_classifier.data import small_images
from flower_classifier.data.folders import find_splits
from flower_classifier.data.images import load_image
from flower_classifier.data.transforms import eval_transform
from flower_classifier.models import scratch_cnn
from flower_classifier.models.backbones import Preprocess
from flower_classifier.training.config import family_default, saved_hyperparameters

CIFAR_CLASSES = ("airplane", "cat", "ship")
CIFAR_SIZES = {"train": 12, "valid": 4, "test": 4}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp("cifar") / "data", CIFAR_CLASSES, CIFAR_SIZES,
                       CIFAR)


def candidate_views(image, padding):
    """Every crop of the reflect-padded image and of its mirror image: what augmentation may give."""
    views = []
    for source in (image, image.flip(2)):
        padded = F.pad(source[None].float(), [padding] * 4, mode="reflect")[0]
        height, width = image.shape[1:]
        views += [padded[:, top:top + height, left:left + width]
                  for top in range(2 * padding + 1) for left in range(2 * padding + 1)]
    return torch.stack(views)


def test_augment_batch_crops_and_mirrors_each_image():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 10, 12), dtype=torch.uint8)
    augmented = small_images.augment_batch(images, padding=2)
    assert augmented.shape == images.shape and augmented.dtype == torch.uint8
    assert augmented.is_contiguous(memory_format=torch.channels_last)
    kinds = set()
    for image, view in zip(images, augmented.float()):
        candidates = candidate_views(image, padding=2)
        match = torch.nonzero((candidates == view).flatten(1).all(1)).flatten()
        assert len(match) >= 1, "not a crop of the padded image or of its mirror image"
        kinds.add(int(match[0]) // (len(candidates) // 2))
    assert kinds == {0, 1}  # some images mirrored, some not


def test_augment_batch_without_padding_only_mirrors():
    torch.manual_seed(1)
    images = torch.randint(0, 256, (32, 3, 5, 5), dtype=torch.uint8)
    augmented = small_images.augment_batch(images, padding=0)
    same = (augmented == images).flatten(1).all(1)
    mirrored = (augmented == images.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()


def test_decoded_images_normalise_exactly_as_predict_reads_them(cifar, tmp_path):
    _, splits = find_splits(cifar)
    paths = splits["valid"].paths[:5]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    size = small_images.input_size(splits["train"].paths)
    assert size == 32
    images, ok = small_images.decode_images(paths + [str(broken)], size)
    assert ok.tolist() == [True] * 5 + [False]
    preprocess = Preprocess(size, size, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    expected = torch.stack([eval_transform(preprocess)(load_image(path)) for path in paths])
    normalised = small_images.normalize(images[:5], preprocess.mean, preprocess.std)
    torch.testing.assert_close(normalised, expected)


def test_network_averages_each_image_with_its_mirror_in_eval_mode():
    torch.manual_seed(0)
    network = scratch_cnn.SmallCNN(widths=(8, 16, 16), stem_width=4)
    images = torch.randn(3, 3, 32, 32)
    assert network(images).shape == (3, network.feature_dim)  # training mode: one pass
    network.eval()
    with torch.no_grad():
        torch.testing.assert_close(network(images), network(images.flip(3)))
        assert not torch.allclose(network(images), network.train()(images))


def normalised_train_images(cifar):
    """The subset's training images as ScratchTask normalises them, in the split's order."""
    _, splits = find_splits(cifar)
    images, _ = small_images.decode_images(splits["train"].paths, 32)
    return small_images.normalize(images, scratch_cnn.MEAN, scratch_cnn.STD).float()


def test_whitening_filters_decorrelate_the_patches_of_real_images(cifar):
    images = normalised_train_images(cifar)
    filters = scratch_cnn.whitening_filters(images, kernel_size=2, eps=0)
    assert filters.shape == (24, 3, 2, 2)
    torch.testing.assert_close(filters[12:], -filters[:12])
    responses = F.conv2d(images.double(), filters[:12].double())  # N 12 H' W'
    responses = responses.permute(1, 0, 2, 3).flatten(1)
    covariance = torch.cov(responses)  # pixel patches: strongly correlated; whitened: identity
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.double), atol=1e-3,
                               rtol=0)
    pixels = F.unfold(images.double(), 2).permute(1, 0, 2).flatten(1)
    assert torch.corrcoef(pixels)[0, 1] > 0.8  # what the whitening took away


def test_whitened_stem_is_frozen_and_the_rest_trains(cifar):
    torch.manual_seed(0)
    network = scratch_cnn.SmallCNN(widths=(8, 16, 16))
    images = normalised_train_images(cifar)
    network.whiten_stem(images)
    stem, first_group = (network.stem[0].weight.clone(),
                         network.groups[0][0].weight.clone())
    optimizer = scratch_cnn.sgd(network.parameters(), 0.1, 5e-3)
    network(images).sum().backward()
    optimizer.step()
    torch.testing.assert_close(network.stem[0].weight, scratch_cnn.whitening_filters(images, 2))
    torch.testing.assert_close(network.stem[0].weight, stem)
    assert not torch.allclose(network.groups[0][0].weight, first_group)
    with pytest.raises(ValueError, match="needs 24 filters, not 4"):
        scratch_cnn.SmallCNN(widths=(8, 16, 16), stem_width=4).whiten_stem(images)


def test_cnn_trains_from_scratch_resumes_and_predicts(cifar, tmp_path):
    import train
    from flower_classifier.inference.predictor import Predictor
    from flower_classifier.models.checkpoint import load_checkpoint

    whole = train.main(train_args(cifar, tmp_path / "whole", tmp_path / "cache", "--arch", "cnn",
                                  "--epochs", "2", "--batch_size", "16"))
    assert [record["epoch"] for record in whole["history"]] == [1, 2]
    checkpoint_path = tmp_path / "whole" / "checkpoint.pth"
    assert checkpoint_path.stat().st_size < 5e6
    checkpoint = load_checkpoint(checkpoint_path)
    assert checkpoint["arch"] == "cnn" and checkpoint["backbone_state"] is not None
    assert checkpoint["preprocess"]["crop"] == 32
    assert checkpoint["hyperparameters"]["learning_rate"] == family_default(
        "learning_rate", "scratch")
    # The stem whitens the training images' patches, and two epochs left it as it began.
    assert checkpoint["hyperparameters"]["whiten_stem"] is True
    torch.testing.assert_close(checkpoint["backbone_state"]["stem.0.weight"],
                               scratch_cnn.whitening_filters(normalised_train_images(cifar), 2))
    assert (tmp_path / "whole" / "test_report.json").is_file()
    # two epochs on 12 photos a class: mistakes, on a page without heatmaps (no maps to weigh)
    page = (tmp_path / "whole" / "mistakes.html").read_text()
    assert "<figure>" in page and "data:image/png" not in page

    with stopped_at_epoch(2):
        train.main(train_args(cifar, tmp_path / "cut", tmp_path / "cache", "--arch", "cnn",
                              "--epochs", "2", "--batch_size", "16"))
    resumed = train.main(train_args(cifar, tmp_path / "cut", tmp_path / "cache", "--resume",
                                    tmp_path / "cut" / "checkpoint.pth"))
    assert [record["epoch"] for record in resumed["history"]] == [1, 2]
    last = {name: load_checkpoint(tmp_path / run / "train_state.pth")["last_model_state"]
            for name, run in (("whole", "whole"), ("cut", "cut"))}
    for key, value in last["whole"].items():
        torch.testing.assert_close(last["cut"][key], value)

    predictor = Predictor(checkpoint_path)
    images = sorted((cifar / "test" / "ship").iterdir())[:3]
    # The traced fast path, on a batch of another size than the trace's example, agrees.
    for image, batched in zip(images, predictor.predict_files(images, top_k=3, workers=0)):
        single = predictor.predict_image(image, top_k=3)
        assert len(single.classes) == 3 and batched.classes == single.classes
        torch.testing.assert_close(torch.tensor(batched.probabilities),
                                   torch.tensor(single.probabilities), atol=1e-4, rtol=0)
    refused = run_command("predict.py", images[0], checkpoint_path, "--plot",
                          tmp_path / "plot.png", "--heatmap")
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr == (
        "error: --heatmap needs a pretrained backbone; the network trained from scratch (--arch "
        "cnn) has no maps to weigh: leave out --heatmap\n")


def test_no_whiten_stem_trains_the_stem_from_its_random_start(cifar, tmp_path):
    import train
    from flower_classifier.models.checkpoint import load_checkpoint

    train.main(train_args(cifar, tmp_path / "run", tmp_path / "cache", "--arch", "cnn",
                          "--epochs", "1", "--batch_size", "16", "--no_whiten_stem"))
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert checkpoint["hyperparameters"]["whiten_stem"] is False
    torch.manual_seed(0)  # train.py's seed, set before the network is made
    start = scratch_cnn.SmallCNN().stem[0].weight
    trained = checkpoint["backbone_state"]["stem.0.weight"]
    assert trained.shape == start.shape and not torch.allclose(trained, start)
    assert saved_hyperparameters({})["whiten_stem"] is False  # runs begun before it resume so


def test_network_converts_for_openvino_with_any_batch_size(tmp_path):
    """predict.py runs large jobs through OpenVINO (torch.export with a free batch size)."""
    from flower_classifier.models import engines

    torch.manual_seed(0)
    network = scratch_cnn.SmallCNN(widths=(8, 16, 16), stem_width=4).eval()
    images = torch.randn(3, 3, 32, 32)
    engine = engines.compile_backbone(network, 32, torch.device("cpu"), engine="openvino",
                                      cache_dir=tmp_path)
    with torch.no_grad():
        expected = network(images)
    tolerance = 3e-2 if engine.precision == "bf16" else 1e-4
    torch.testing.assert_close(engine(images), expected, atol=tolerance, rtol=tolerance)


def test_torchrun_trains_the_cnn_on_two_processes(cifar, tmp_path):
    from conftest import run_script
    from flower_classifier.models.checkpoint import load_checkpoint

    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", cifar,
                        "--arch", "cnn", "--save_dir", tmp_path / "run", "--cache_dir",
                        tmp_path / "cache", "--epochs", "2", "--batch_size", "8", "--workers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sum(line.startswith("epoch") for line in result.stdout.splitlines()) == 2  # rank 0
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert checkpoint["arch"] == "cnn" and checkpoint["preprocess"]["crop"] == 32
    assert checkpoint["backbone_state"] is not None and checkpoint["epoch"] in (1, 2)
