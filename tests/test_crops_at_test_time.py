"""benchmarks/crops_at_test_time.py: the crop views it cuts, its scores per crop set (today's
baseline scored as quality.py scores it), its error line for a missing folder."""
import json
import sys

import pytest
import torch

from conftest import FLOWERS, PROJECT, make_subset, require_shared_data, run_command

sys.path.append(str(PROJECT / "benchmarks"))
import crops_at_test_time as crops  # noqa: E402

import quality  # noqa: E402
from flower_classifier.data.images import load_image
from flower_classifier.data.transforms import eval_transform


def test_views_are_distinct_crops_and_the_centre_is_eval_transforms():
    require_shared_data()
    preprocess = quality.feature_backbone().preprocess
    image = load_image(next((FLOWERS / "valid" / "1").iterdir()))
    views = crops.CropViews(preprocess, crops.VIEWS)(image)
    assert views.shape == (14, 3, preprocess.crop, preprocess.crop)
    centre = views[crops.VIEWS.index(crops.CENTRE)]
    assert torch.equal(centre, eval_transform(preprocess)(image))
    assert torch.equal(views[crops.VIEWS.index(crops.MIRROR)], centre.flip(2))
    distinct = {tuple(view.flatten()[::97].tolist()) for view in views}
    assert len(distinct) == len(crops.VIEWS)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops")
    # Twelve classes of 3 + 2 photos and 2 epochs: held-out accuracies far from 100%, so the
    # crop sets' scores can differ and today's can be matched against quality.py's.
    data = make_subset(root / "data", classes=tuple(str(number) for number in range(1, 13)),
                       sizes={"train": 3, "valid": 2})
    return scored_run(data, root)


def scored_run(data, root, *extra):
    """(args, results, the JSON written) of a 2-fold run of 2 epochs."""
    args = crops.get_args_parser().parse_args(
        [str(data), "--cache_dir", str(root / "cache"), "--folds", "2", "--epochs", "2",
         "--time_images", "3", "--json", str(root / "crops.json"), *extra])
    return args, crops.main(args), json.loads((root / "crops.json").read_text())


def test_every_crop_set_is_scored_and_timed(run):
    _, _, written = run
    assert list(written["crop_sets"]) == list(crops.CROP_SETS)
    for name, figures in written["crop_sets"].items():
        assert figures["passes"] == len(crops.CROP_SETS[name])
        assert figures["cpu_seconds_per_image"] > 0
        for method in crops.METHODS:
            assert len(figures[method]["folds"]) == 2
            assert all(0 <= score <= 100 for score in figures[method]["folds"])
    scores = {tuple(figures[method]["folds"]) for figures in written["crop_sets"].values()
              for method in crops.METHODS}
    assert len(scores) > 1  # the views change the predictions
    today = written["crop_sets"][crops.BASELINE[0]]
    assert today["features"]["gain_mean"] == 0
    ten = written["crop_sets"]["ten crops (five + mirrors)"]
    assert ten["cpu_seconds_per_image"] > 2 * today["cpu_seconds_per_image"]  # 10 passes, not 2


def test_todays_baseline_is_quality_pys_score(run):
    """Centre + mirror with features averaged, on the same folds and head, is exactly what
    quality.fit_and_score gives on the image and mirror features."""
    args, results, _ = run
    extractor = crops.FeatureExtractor(quality.feature_backbone(), quality.CPU, workers=0)
    data = crops.load_view_features(args, extractor)  # from the cache now
    centre, mirror = crops.VIEWS.index(crops.CENTRE), crops.VIEWS.index(crops.MIRROR)
    pool = {"plain": torch.cat([data[s]["views"][:, centre] for s in ("train", "valid")]),
            "mirror": torch.cat([data[s]["views"][:, mirror] for s in ("train", "valid")]),
            "labels": torch.cat([data[s]["labels"] for s in ("train", "valid")])}
    fold_of = quality.stratified_folds(pool["labels"], 2, args.seed)
    setting = {**quality.SETTINGS[crops.DEFAULT_SETTINGS[False]], "epochs": 2}
    expected = [100 * quality.fit_and_score(setting, quality.subset(pool, fold_of != fold),
                                            quality.subset(pool, fold_of == fold),
                                            data["class_count"], args.seed)
                for fold in range(2)]
    scored = results["crop_sets"][crops.BASELINE[0]]["features"]["folds"]
    assert scored == pytest.approx(expected)


def test_trained_stages_score_every_view_through_the_trained_stages(run, tmp_path):
    args, frozen, _ = run
    # One pass over the folder an epoch, not train.py's 40 steps at least: the views' scoring
    # through the trained stages is what is checked here.
    stages_args, results, _ = scored_run(args.data_dir, tmp_path, "--train_stages", "2",
                                         "--min_epoch_steps", "0")
    extractor = crops.FeatureExtractor(quality.feature_backbone(), quality.CPU, workers=0,
                                       bottom=crops.split_backbone(quality.feature_backbone(),
                                                                   2)[0], trained_stages=2)
    cached = crops.load_view_features(stages_args, extractor)["train"]["views"]
    assert cached.shape[1:3] == (len(crops.VIEWS), 192)  # [N, views, C, H, W] activations
    assert list(results["crop_sets"]) == list(crops.CROP_SETS)
    assert results["train_stages"] == 2 and results["setting"]["backbone_lr"] == 3e-4
    assert results["setting"]["min_epoch_steps"] == 0

    def accuracies(figures):
        return [figures[name][method]["folds"] for name in crops.CROP_SETS
                for method in crops.METHODS]

    assert accuracies(results["crop_sets"]) != accuracies(frozen["crop_sets"])


def test_missing_folder_is_one_line_and_exit_2(tmp_path):
    result = run_command(crops, tmp_path / "none", "--cache_dir", tmp_path / "cache")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
