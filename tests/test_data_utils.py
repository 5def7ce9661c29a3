"""Folders, class mappings and image loading."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torchvision import transforms

from flower_classifier.data.class_names import load_category_names
from flower_classifier.data.folders import find_splits, list_images
from flower_classifier.data.images import centre_crop_to_aspect, load_image, to_rgb
from flower_classifier.data.loading import ImageFiles
from flower_classifier.data.transforms import eval_transform
from flower_classifier.models.backbones import Preprocess
from flower_classifier.utils.errors import UserError

PREPROCESS = Preprocess(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)


def write_image(path, mode="RGB", size=(40, 30), color=(200, 30, 60)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).convert(mode).save(path)
    return path


def make_tree(root, layout):
    """layout: {"train/1": 2, ...} -> that many small images in each folder."""
    for folder, count in layout.items():
        for index in range(count):
            write_image(root / folder / f"img{index}.png")
    return root


def test_class_mapping_treats_numeric_folders_as_names(tmp_path):
    make_tree(tmp_path, {"train/1": 1, "train/10": 1, "train/2": 1, "valid/2": 1, "valid/10": 1})
    class_to_idx, splits = find_splits(tmp_path)
    assert class_to_idx == {"1": 0, "10": 1, "2": 2}
    labels = dict(zip((p.split("/")[-2] for p in splits["valid"].paths), splits["valid"].labels))
    # "1" is missing from valid: the others keep train's indices instead of shifting down.
    assert labels == {"10": 1, "2": 2}
    assert "test" not in splits


def test_class_in_valid_that_train_lacks_is_an_error(tmp_path):
    make_tree(tmp_path, {"train/a": 1, "valid/a": 1, "valid/zebra": 1})
    with pytest.raises(UserError, match="zebra"):
        find_splits(tmp_path)


@pytest.mark.parametrize("layout, problem", [
    ({}, "does not exist"),
    ({"valid/a": 1}, "no train/"),
    ({"train/a": 1}, "no valid/"),
    ({"train/a": 1, "train/b": 0, "valid/a": 1}, "no images: b"),
    ({"train/a": 0, "valid/a": 1}, "holds no images"),
])
def test_bad_data_folders(tmp_path, layout, problem):
    data = tmp_path / "data"
    if layout:
        make_tree(data, layout)
        for folder in layout:
            (data / folder).mkdir(parents=True, exist_ok=True)
    with pytest.raises(UserError, match=problem):
        find_splits(data)


def test_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "flowers.zip").write_bytes(b"zip")
    with pytest.raises(UserError, match="is a file"):
        find_splits(tmp_path / "flowers.zip")


def test_non_images_are_not_listed_and_symlinked_classes_are(tmp_path):
    make_tree(tmp_path, {"train/a": 1, "valid/a": 1, "elsewhere/b": 2})
    (tmp_path / "train/a/notes.txt").write_text("not an image")
    (tmp_path / "train/a/.DS_Store").write_bytes(b"\0\0")
    (tmp_path / "train/a/._img0.png").write_bytes(b"\0\0")  # macOS resource fork
    write_image(tmp_path / "train/a/anim.gif")
    (tmp_path / "train/b").symlink_to(tmp_path / "elsewhere/b", target_is_directory=True)
    write_image(tmp_path / "train/a/ünïcode name.png")
    _, splits = find_splits(tmp_path)
    names = sorted(p.split("/")[-1] for p in splits["train"].paths)
    assert names == ["img0.png", "img0.png", "img1.png", "ünïcode name.png"]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_every_image_mode_loads_as_rgb(tmp_path, mode):
    path = tmp_path / f"image.{'jpg' if mode == 'CMYK' else 'png'}"
    if mode == "I;16":
        Image.fromarray(np.full((30, 40), 50000, dtype=np.uint16)).save(path)
    else:
        write_image(path, mode)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    if mode == "I;16":  # 16-bit levels scaled down, not clipped to white
        assert image.getpixel((0, 0)) == (194, 194, 194)


@pytest.mark.parametrize("mode, level, expected", [("I;16", 50000, 194), ("I;16", 200, 200),
                                                     ("I", 50000, 194)])
def test_sixteen_and_32_bit_levels_are_scaled_to_8_bits(mode, level, expected):
    image = Image.fromarray(np.full((30, 40), level, dtype=np.uint16)).convert(mode)
    assert to_rgb(image).getpixel((0, 0)) == (expected,) * 3


@pytest.mark.parametrize("suffix", [".eps", ".ico", ".pcx", ".tga"])
def test_formats_outside_the_list_are_never_opened(tmp_path, suffix):
    """EPS would be handed to Ghostscript; ICO decodes an embedded PNG before any size check."""
    path = write_image(tmp_path / f"image{suffix}")
    with pytest.raises(UnidentifiedImageError):
        load_image(path)


def test_first_frame_of_a_gif_and_first_page_of_a_tiff(tmp_path):
    for suffix in (".gif", ".tiff"):
        path = tmp_path / f"two{suffix}"
        first, second = Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))
        first.save(path, save_all=True, append_images=[second])
        assert load_image(path).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("1", (9500, 9500)).save(path)  # 10 KB that would decode to 90 million pixels
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: pytest.fail("decoded"))
    with pytest.raises(Image.DecompressionBombError, match="9500x9500 pixels"):
        load_image(path)


def test_extreme_aspect_ratio_is_cropped_without_changing_the_prediction_input():
    """A 4000x100 strip keeps its centre 800x100: the same tensor after eval_transform, without
    the 10240x256 resize of the whole strip (a 4000x1 one would need 1,024,000x256)."""
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 4000, 3), np.uint8))
    cropped = centre_crop_to_aspect(strip)
    assert cropped.size == (800, 100)
    assert np.array_equal(np.asarray(cropped), np.asarray(strip)[:, 1600:2400])
    assert centre_crop_to_aspect(Image.new("RGB", (4000, 1))).size == (8, 1)
    transform = eval_transform(PREPROCESS)
    assert torch.allclose(transform(cropped), transform(strip), atol=1e-5)
    assert to_rgb(strip).size == (800, 100)


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "cut_out.png"
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(path)
    assert load_image(path).getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (40, 20), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # the camera was turned: display rotated by 90 degrees
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_unreadable_files_yield_not_ok(tmp_path):
    good = write_image(tmp_path / "good.png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("this is not a jpeg")
    truncated = tmp_path / "truncated.jpg"
    write_image(tmp_path / "full.jpg", size=(300, 300))
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:600])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)  # 200 Mpixels: over Pillow's safety limit
    dataset = ImageFiles([str(p) for p in (good, empty, text, truncated, bomb)],
                         eval_transform(PREPROCESS), 224)
    assert [dataset[i][2] for i in range(len(dataset))] == [True, False, False, False, False]
    assert dataset[1][0].shape == (3, 224, 224)


def test_eval_transform_normalises_to_the_backbone(tmp_path):
    tensor = eval_transform(PREPROCESS)(load_image(write_image(tmp_path / "x.png",
                                                               color=(255, 0, 128))))
    assert tensor.shape == (3, 224, 224)
    assert torch.allclose(tensor[:, 100, 100], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]),
                          atol=1e-6)


def test_list_images_is_recursive_and_sorted(tmp_path):
    make_tree(tmp_path, {"b": 1, "a/deep": 2})
    (tmp_path / "a/readme.txt").write_text("x")
    assert [p[len(str(tmp_path)):] for p in list_images(tmp_path)] == [
        "/a/deep/img0.png", "/a/deep/img1.png", "/b/img0.png"]


def test_category_names(tmp_path):
    good = tmp_path / "names.json"
    good.write_text(json.dumps({"1": "pink primrose", "2": 5}))
    assert load_category_names(good) == {"1": "pink primrose", "2": "5"}
    with pytest.raises(UserError, match="not found"):
        load_category_names(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{'1': 'single quotes'}")
    with pytest.raises(UserError, match="not valid JSON"):
        load_category_names(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text('["pink primrose"]')
    with pytest.raises(UserError, match="JSON object"):
        load_category_names(tmp_path / "list.json")


def striped_photo(size):
    """Left half red, right half blue: which side is where shows the orientation."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


def test_large_jpeg_is_drafted_to_the_target_with_exif_orientation(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated clockwise: red on top
    striped_photo((4032, 3024)).save(path, exif=exif, quality=90)
    full, drafted = load_image(path), load_image(path, target=256)
    assert full.size == (3024, 4032)
    # 1/8 would give 378 x 504, the smallest DCT scale with both sides >= 256.
    assert drafted.size == (378, 504)
    top, bottom = drafted.getpixel((189, 50)), drafted.getpixel((189, 450))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]
    full_tensor = eval_transform(PREPROCESS)(full)
    assert (eval_transform(PREPROCESS)(drafted) - full_tensor).abs().mean() < 0.02


def test_draft_never_goes_below_the_target_and_leaves_other_formats_alone(tmp_path):
    jpeg, png = tmp_path / "small.jpg", tmp_path / "large.png"
    striped_photo((300, 1000)).save(jpeg)
    striped_photo((1000, 600)).save(png)
    assert load_image(jpeg, target=256).size == (300, 1000)  # 1/2 would give 150 < 256
    assert load_image(png, target=256).size == (1000, 600)


@pytest.mark.parametrize("suffix", [".heic", ".heif", ".avif"])
def test_phone_formats_are_listed_and_read_upright(tmp_path, suffix):
    path = tmp_path / "train" / "a" / f"iphone{suffix}"
    path.parent.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    striped_photo((64, 48)).save(path, format="HEIF" if suffix != ".avif" else "AVIF",
                                 exif=exif.tobytes())
    write_image(tmp_path / "valid" / "a" / "x.png")
    _, splits = find_splits(tmp_path)
    assert splits["train"].paths == [str(path)]
    assert list_images(tmp_path / "train") == [str(path)]
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (48, 64)
    top, bottom = image.getpixel((24, 8)), image.getpixel((24, 56))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]
    dataset = ImageFiles([str(path)], eval_transform(PREPROCESS), 224, draft=256)
    assert dataset[0][2] and dataset[0][0].shape == (3, 224, 224)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_transform_resizes_with_the_backbones_filter(interpolation):
    """A 512-px photo resized to 256 as the backbone's preprocessing says: the same pixels as
    torchvision's resize with that filter, and not those of the other filter."""
    torch.manual_seed(0)
    noise = (torch.rand(3, 300, 512) * 255).to(torch.uint8)
    image = transforms.functional.to_pil_image(noise)
    preprocess = dataclasses.replace(PREPROCESS, interpolation=interpolation)
    other = "bicubic" if interpolation == "bilinear" else "bilinear"
    expected = {name: transforms.functional.to_tensor(transforms.functional.center_crop(
        transforms.functional.resize(image, 256, transforms.InterpolationMode(name)), 224)) * 2 - 1
        for name in (interpolation, other)}
    tensor = eval_transform(preprocess)(image)
    assert torch.allclose(tensor, expected[interpolation], atol=1e-6)
    assert not torch.allclose(tensor, expected[other], atol=1e-2)
