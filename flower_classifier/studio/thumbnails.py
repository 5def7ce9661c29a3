"""Photos shown by the studio: never the file's own bytes, always a JPEG re-encoded from the
safe decoder (data.images' open_image and to_rgb, as load_image), cached on disk in the
save folder.

    path = cached_view("photos/1/a.jpg", Path("studio/thumbnails"), THUMB_SIDE)
    data = cached_bytes("photos/1/a.jpg", Path("studio/thumbnails"), THUMB_SIDE)  # or None
    check_dataset(..., views=CheckThumbnails(Path("studio/thumbnails")))  # made as it reads
"""
import hashlib
import io
import logging
import os
import threading
import time
from pathlib import Path

from PIL import Image

from flower_classifier.data.images import (
    UNREADABLE_IMAGE_ERRORS,
    draft_to_fit,
    open_image,
    to_rgb,
)
from flower_classifier.serve.answers import BadRequest
from flower_classifier.utils.errors import UserError, error_reason
from flower_classifier.utils.files import atomic_write
from flower_classifier.utils.threads import lower_priority

THUMB_SIDE = 256     # gallery thumbnails: the longer side, in pixels
LARGE_SIDE = 1024    # a photo opened on its own
THUMBNAILS_FOLDER = "thumbnails"
LOG = logging.getLogger("uvicorn.error")  # the studio's log, as the server's


def view_name(path, side):
    """The cache file's name: a digest of the photo's resolved path, size, time and the side."""
    stat = os.stat(path)
    text = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{side}"
    return hashlib.sha256(text.encode()).hexdigest()[:40] + ".jpg"


def decoded_to_fit(path, side):
    """The photo (as load_image gives it; path or a file object) decoded at the smallest JPEG
    scale that covers side."""
    with open_image(path) as image:
        draft_to_fit(image, side)
        return to_rgb(image)


def save_view(target, image, side):
    """Write image scaled to fit side x side to target as a JPEG (atomic_write's UserError when
    it cannot be written)."""
    image.thumbnail((side, side), Image.Resampling.BILINEAR)
    atomic_write(target, lambda temporary: image.save(temporary, "JPEG", quality=85))


def cached_bytes(path, folder, side):
    """The bytes of the view made before, None when there is none (or the photo is gone): a
    stat and a small read, cheap enough to answer on the event loop without a thread."""
    try:
        return (Path(folder) / view_name(path, side)).read_bytes()
    except OSError:
        return None


def cached_view(path, folder, side):
    """The JPEG of the photo at path scaled to fit side x side, from folder when made before.
    An unreadable photo is a 422 that says why."""
    try:
        target = Path(folder) / view_name(path, side)
    except OSError as error:
        raise BadRequest(404, f"The photo is gone ({error_reason(error)}).") from None
    if target.is_file():
        return target
    try:
        image = decoded_to_fit(path, side)
    except UNREADABLE_IMAGE_ERRORS as error:
        raise BadRequest(422, f"This photo cannot be decoded ({error_reason(error)}); drop it "
                         "or replace the file.") from None
    try:
        save_view(target, image, side)
    except UserError as error:
        raise BadRequest(500, f"The thumbnail could not be cached: {error}.") from None
    return target


class CheckThumbnails:
    """The data check's views (datacheck.facts.file_facts): the check reads every photo, so it
    makes each thumbnail not made yet from the bytes it has read, in its worker processes, and
    the galleries are served from disk as soon as it ends instead of while the warmer catches up.
    kept: the paths whose thumbnail is on disk (filled by the check: keep may run in its worker
    processes), which the warmer skips."""

    def __init__(self, folder, side=THUMB_SIDE):
        self.folder, self.side, self.failed = Path(folder), side, False
        self.kept = set()

    def keep(self, path, data, decoded):
        """Make path's thumbnail unless it is made: from decoded, the check's own decode, when
        it covers the side (a 12 MP photo at 1/8 scale), else from the bytes, data, decoded
        again. True when it is on disk. A folder that cannot be written stops the rest (logged
        once a process); an unreadable photo is the check's finding."""
        if self.failed:
            return False
        try:
            target = self.folder / view_name(path, self.side)
            if not target.is_file():
                if max(decoded.size) < self.side:
                    decoded = decoded_to_fit(io.BytesIO(data), self.side)
                save_view(target, decoded, self.side)
            return True
        except UNREADABLE_IMAGE_ERRORS:  # the check reports it (or the stat failed)
            return False
        except UserError as error:
            self.failed = True
            LOG.warning("thumbnails not made during the check: %s", error)
            return False


class ThumbnailWarmer:
    """Makes the thumbnails of each gallery's first page, then of every other photo
    (Studio.thumbnails_to_make), in a background thread at a low priority once the studio is open,
    so that a page of a gallery is served from the disk cache rather than decoded on demand
    (benchmarks/studio_scale.py times both).

        warmer = ThumbnailWarmer(studio, studio.save_dir / THUMBNAILS_FOLDER)
        warmer.start()   ...   warmer.stop()
    """

    def __init__(self, studio, folder):
        self.studio, self.folder = studio, folder
        self.stopping, self.thread = threading.Event(), None

    def start(self):
        """Begin in a thread of its own."""
        self.thread = threading.Thread(target=self.run, daemon=True, name="thumbnails")
        self.thread.start()

    def stop(self, timeout=30):
        """End after the thumbnail being made, and wait for it."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def run(self):
        """Make each thumbnail not on disk yet."""
        lower_priority()
        for photo_id in self.studio.thumbnails_to_make():
            if self.stopping.is_set():
                return
            try:
                cached_view(self.studio.image_path(photo_id), self.folder, THUMB_SIDE)
            except BadRequest as error:
                if error.status >= 500:  # the cache cannot be written: trying on is no use
                    LOG.warning("thumbnails stopped: %s", error)
                    return
                continue  # unreadable or gone: the gallery says so when asked
            except Exception:  # a bug: logged, and the thumbnails are made on demand instead
                LOG.exception("thumbnails stopped")
                return
            time.sleep(0)  # hand the GIL to the server between photos, not after 5 ms of lookups

