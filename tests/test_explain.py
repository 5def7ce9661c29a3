"""Grad-CAM heatmaps (models/explain.py) on a trained checkpoint: a flower pasted into noise is
where the heatmap is; predict.py --plot --heatmap draws it, and --report's mistakes.html."""
import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from conftest import FLOWERS, SUBSET_CLASSES, make_subset, train_args
from flower_classifier.data.images import load_image
from flower_classifier.inference.predictor import Predictor
from flower_classifier.models.explain import colour_map, explain_image
from flower_classifier.utils.errors import UserError

CANVAS, CROP = 256, 224          # the eval transform keeps a 256 x 256 image and crops 224
PATCH = (56, 56, 168, 168)       # in the canvas: 112 x 112, a quarter of the crop's area


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained[1] / "checkpoint.pth"


def pasted_into_noise(photo, seed):
    """The photo scaled into PATCH of a canvas of uniform noise."""
    noise = np.random.default_rng(seed).integers(0, 256, (CANVAS, CANVAS, 3), dtype=np.uint8)
    canvas = Image.fromarray(noise)
    left, top, right, bottom = PATCH
    canvas.paste(load_image(photo).resize((right - left, bottom - top)), (left, top))
    return canvas


@pytest.mark.parametrize("name", SUBSET_CLASSES)
def test_the_heatmap_of_a_flower_pasted_into_noise_lies_mostly_on_the_flower(checkpoint, name):
    predictor = Predictor(checkpoint)
    photo = sorted((FLOWERS / "test" / name).iterdir())[0]  # never trained on
    explanation = explain_image(predictor.model, predictor.transform,
                                pasted_into_noise(photo, seed=len(name)),
                                list(predictor.classes).index(name))
    heatmap = explanation.heatmap
    assert heatmap.shape == (CROP, CROP) and heatmap.min() >= 0 and heatmap.max() == 1
    offset = (CANVAS - CROP) // 2
    left, top, right, bottom = (side - offset for side in PATCH)
    inside = heatmap[top:bottom, left:right].sum() / heatmap.sum()
    assert inside >= 0.5, f"only {inside:.0%} of the heatmap is on the flower"
    assert explanation.overlay().size == (CROP, CROP)


def test_the_colour_map_runs_from_blue_to_red():
    ramp = colour_map(np.array([[0.0, 1.0]]))
    assert ramp[0, 0, 2] > ramp[0, 0, 0] and ramp[0, 1, 0] > ramp[0, 1, 2]


def test_predict_plot_heatmap_draws_the_overlay(checkpoint, tmp_path, capsys):
    import predict

    photo = sorted((FLOWERS / "test" / "2").iterdir())[0]
    out = tmp_path / "heatmap.png"
    predict.main(predict.get_args_parser().parse_args(
        [str(photo), str(checkpoint), "--plot", str(out), "--heatmap", "--top_k", "3"]))
    assert out.stat().st_size > 0 and Image.open(out).format == "PNG"
    assert f"saved {out}" in capsys.readouterr().out
    with pytest.raises(UserError, match="--plot"):
        predict.main(predict.get_args_parser().parse_args(
            [str(photo), str(checkpoint), "--heatmap"]))


def test_the_report_page_shows_each_mistake_with_its_heatmap(checkpoint, tmp_path):
    """predict.py --report on photos of class 2 filed under 1: mistakes.html has each wrongly
    named photo and the Grad-CAM overlay of what the model looked at (the crop it saw)."""
    import predict

    filed_wrongly = tmp_path / "labelled" / "1"
    filed_wrongly.mkdir(parents=True)
    for photo in sorted((FLOWERS / "test" / "2").iterdir())[:3]:
        (filed_wrongly / photo.name).symlink_to(photo)
    report = predict.main(predict.get_args_parser().parse_args(
        [str(tmp_path / "labelled"), str(checkpoint), "--report", str(tmp_path / "report"),
         "--workers", "0"]))
    wrong = round(report["images"] * (1 - report["accuracy"]))
    assert wrong >= 2
    page = (tmp_path / "report" / "mistakes.html").read_text()
    sources = re.findall(r'<img src="data:image/(\w+);base64,([^"]+)"', page)
    assert [kind for kind, _ in sources] == ["jpeg", "png"] * wrong
    for _, data in sources[1::2]:
        with Image.open(io.BytesIO(base64.b64decode(data))) as overlay:
            assert overlay.format == "PNG" and overlay.size == (CROP, CROP)
    assert page.count(f'href="{(filed_wrongly).as_uri()}/') == wrong


def test_train_py_writes_the_mistakes_page_with_heatmaps(tmp_path):
    """train.py's save folder: mistakes.html beside mistakes.png, the misfiled test photo on it
    with the heatmap of the run's own classifier."""
    import train

    data = make_subset(tmp_path / "data", sizes={"train": 4, "valid": 2, "test": 1})
    misfiled = data / "test" / "1" / "misfiled.jpg"
    misfiled.symlink_to(sorted((FLOWERS / "test" / "2").iterdir())[0])
    train.main(train_args(data, tmp_path / "run", tmp_path / "cache", "--epochs", "3"))
    page = (tmp_path / "run" / "mistakes.html").read_text()
    assert (tmp_path / "run" / "mistakes.png").exists()
    assert f'href="{misfiled.as_uri()}"' in page
    figure = page[page.index("<figure>"):page.index("</figure>")]  # the worst mistake
    assert misfiled.as_uri() in figure and figure.count('src="data:image/png;base64,') == 1
