"""Image decoding that is safe for any file: a training folder's and a server's uploads alike.

    from flower_classifier.data.images import load_image
    image = load_image("photo.jpg")            # RGB, EXIF orientation applied
    image = load_image("photo.jpg", 256)       # a large JPEG decoded at a reduced scale >= 256 px

Images are JPEG, PNG, WebP, TIFF (first page), BMP, GIF (first frame), PPM/PGM and the phone
formats HEIC/HEIF (iPhones' default, read through pillow-heif) and AVIF. No other format is ever
opened (EPS would run Ghostscript), and an image's size is checked from its header before any
pixel is decoded.
"""
import contextlib
import math
import os
import struct
import warnings

from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

try:  # HEIC/HEIF, the format iPhones save by default; Pillow reads AVIF itself
    import pillow_heif
except ImportError:  # optional: without it, .heic files are reported unreadable
    pillow_heif = None
else:
    pillow_heif.register_heif_opener()

IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".heic", ".heif", ".avif")

# What Pillow and pillow-heif raise for files that are not images, are damaged, or are too large
# to decode safely (decoders of damaged files raise more than OSError).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
                           KeyError, RuntimeError, Image.DecompressionBombError)
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
# The only decoders ever used (the JPEG one also reads cameras' multi-picture MPO files).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "BMP", "TIFF", "GIF", "PPM")
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own safety limit, about 89 million
# open_image refuses images over MAX_PIXELS itself, so Pillow's warning about the half-way
# region before its own limit would only precede that error.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Longest side over shortest side kept: a longer image is cropped about its centre before it is
# resized (a 4000x1 PNG would otherwise become 1,024,000x256 pixels), which keeps every pixel the
# centre crop of eval_transform uses.
MAX_ASPECT_RATIO = 8


def is_image_file(path):
    """By extension, skipping hidden files such as macOS '._photo.jpg' resource forks."""
    return not os.path.basename(path).startswith(".") and has_file_allowed_extension(
        path, IMAGE_EXTENSIONS)


@contextlib.contextmanager
def open_image(path, target=None):
    """The image with only its header read, refused before decoding when it is not one of
    IMAGE_FORMATS or has more than MAX_PIXELS pixels (DecompressionBombError).

    target: the shorter side the transform will resize to. A JPEG is then decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= target: a 12-MP phone photo
    decodes about 7x faster, and the resize that follows sees the same scene.
    """
    with Image.open(path, formats=IMAGE_FORMATS) as image:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise Image.DecompressionBombError(
                f"the image is {width}x{height} pixels, more than the {MAX_PIXELS} decoded safely")
        if target:
            image.draft("RGB", (target, target))  # before any pixel is read; not JPEG: no-op
        yield image


def draft_to_fit(image, side):
    """Have an opened JPEG decode at the smallest DCT scale whose longer side still covers side
    after to_rgb's crop: a view side x side needs that, not the shorter side load_image keeps
    (twice the pixels a thumbnail of the shared flowers needs). Not JPEG: nothing happens."""
    width, height = image.size
    longest = min(max(width, height), min(width, height) * MAX_ASPECT_RATIO)
    scale = side / max(longest, 1)
    if scale < 1:
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))


def centre_crop_to_aspect(image, max_ratio=MAX_ASPECT_RATIO):
    """The image cropped about its centre so its long side is at most max_ratio x its short one."""
    width, height = image.size
    short = max(1, min(width, height))
    keep_width, keep_height = min(width, short * max_ratio), min(height, short * max_ratio)
    if (keep_width, keep_height) == (width, height):
        return image
    left, top = (width - keep_width) // 2, (height - keep_height) // 2
    return image.crop((left, top, left + keep_width, top + keep_height))


def to_rgb(image):
    """An opened image as a new RGB image the way the camera meant it: EXIF rotation applied (in
    place), an extreme aspect ratio cropped, 16-bit levels scaled by Pillow's lookup tables (no
    float copy), transparency over white. At most two images of its size are held at once."""
    ImageOps.exif_transpose(image, in_place=True)  # a copy only when the photo is rotated
    image = centre_crop_to_aspect(image)
    if image.mode in SIXTEEN_BIT_MODES:
        scale = 257 if image.getextrema()[1] > 255 else 1
        image = image.point(lambda level: level / scale).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image.convert("RGB")  # a copy even of an RGB image: the opened one is closed after


def load_image(path, target=None):
    """An RGB image the way the camera meant it (open_image, then to_rgb): safe for any file."""
    with open_image(path, target) as image:
        return to_rgb(image)


def is_readable(path):
    try:
        load_image(path)
    except UNREADABLE_IMAGE_ERRORS:
        return False
    return True
