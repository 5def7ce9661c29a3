"""Download the Oxford-102 flowers into the train/, valid/, test/ folder layout train.py reads.

    from flower_classifier.data.download import download_flowers
    counts = download_flowers("flowers", split="swap")   # {"train": 6149, "valid": 1020, ...}

The three files are fetched once into a download folder (kept: a rerun does not fetch them
again), then the images are sorted into class folders in a hidden staging folder moved into
place only when complete.
"""
import gzip
import http.client
import math
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import scipy.io

from flower_classifier.utils.console import progress
from flower_classifier.utils.errors import UserError, error_reason
from flower_classifier.utils.files import atomic_write

OFFICIAL_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
ARCHIVE_NAME, LABELS_NAME, SETID_NAME = "102flowers.tgz", "imagelabels.mat", "setid.mat"
SPLITS = ("train", "valid", "test")
# Which setid.mat variable feeds each of our folders.
SPLIT_SOURCES = {
    "official": {"train": "trnid", "valid": "valid", "test": "tstid"},
    "swap": {"train": "tstid", "valid": "valid", "test": "trnid"},
}
DOWNLOAD_TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20
# What a dropped, refused or timed-out connection raises (all before the OSError of a failed write).
NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)
# What tarfile raises for a truncated or damaged .tgz.
DAMAGED_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
# The 102 flower names, installed with the package (the same file as the project's
# cat_to_name.json, which a test keeps equal).
CATEGORY_NAMES = Path(__file__).with_name("cat_to_name.json")


def download(url, dest):
    """Fetch url into dest through a temporary file, so a broken download never leaves a half file."""
    dest = Path(dest)
    if dest.exists():
        print(f"using {dest} (already downloaded)")
        return dest
    print(f"downloading {url}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {dest.parent} ({error_reason(error)}); choose a "
                        "folder you can write to with --output or --download_dir") from None
    by_hand = (f"download {ARCHIVE_NAME}, {LABELS_NAME} and {SETID_NAME} by hand from "
               f"{OFFICIAL_URL} into {dest.parent} and run again")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            atomic_write(dest, lambda temporary: save_response(response, temporary, dest.name))
    except urllib.error.HTTPError as error:
        raise UserError(f"could not download {url} (HTTP {error.code} {error.reason}): "
                        f"check --base_url, or {by_hand}") from None
    except NETWORK_ERRORS as error:
        reason = getattr(error, "reason", None) or error
        raise UserError(f"could not download {url} ({reason}): no internet connection? "
                        f"Then {by_hand}") from None
    except ValueError as error:
        raise UserError(f"could not download {url} ({error}): --base_url must be an http(s):// "
                        "or file:// address") from None
    return dest


def read_chunks(response):
    """The response body in chunks; a connection lost on the way is a network error, not the
    write error that atomic_write would take it for."""
    try:
        yield from iter(lambda: response.read(CHUNK_BYTES), b"")
    except OSError as error:  # reading never writes: a reset, a timeout, an SSL error
        raise http.client.HTTPException(f"the connection broke off: {error}") from None


def save_response(response, path, name):
    """Stream the response into path; a body shorter than its Content-Length counts as a failure."""
    expected = int(response.headers.get("Content-Length") or 0) or None
    chunks = read_chunks(response)
    if expected:
        chunks = progress(chunks, math.ceil(expected / CHUNK_BYTES), f"downloading {name}", "MiB")
    received = 0
    with open(path, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
            received += len(chunk)
    if expected and received != expected:
        raise http.client.IncompleteRead(b"", expected - received)


def refuse_existing_output(out_dir):
    """Stop before touching a dataset that is already there: replacing it needs --force."""
    occupied = [name for name in SPLITS if contains_files(Path(out_dir) / name)]
    if occupied:
        folders = ", ".join(f"{name}/" for name in occupied)
        raise UserError(f"{out_dir} already holds images in {folders}; pass --force to replace "
                        "them, or choose another --output")


def contains_files(folder):
    return folder.is_dir() and any(path.is_file() for path in folder.rglob("*"))


def read_mat(path, names):
    """The named variables of a .mat file as flat arrays of positive whole numbers."""
    fix = "delete it and run again to download it afresh"
    try:
        contents = scipy.io.loadmat(path)
    except Exception as error:  # loadmat fails on bad input with anything from IndexError to zlib.error
        raise UserError(f"{path} is damaged or not a MATLAB file ({error}); {fix}") from None
    arrays = []
    for name in names:
        if name not in contents:
            raise UserError(f"{path} lacks the variable '{name}'; {fix}")
        values = np.asarray(contents[name]).ravel()
        if not np.issubdtype(values.dtype, np.number) or np.any(values < 1) or np.any(values % 1):
            raise UserError(f"{path}: '{name}' is not a list of 1-based ids/labels; {fix}")
        arrays.append(values.astype(np.int64))
    return arrays


def plan_destinations(labels, ids_by_split, setid_path):
    """{archive member name: path under the output folder} for every image the split uses."""
    destinations = {}
    for split_name, image_ids in ids_by_split.items():
        for image_id in image_ids:
            if image_id > len(labels):
                raise UserError(f"{setid_path} names image {image_id} but imagelabels.mat labels only "
                                f"{len(labels)} images; download both files again")
            file_name = f"image_{image_id:05d}.jpg"
            member = f"jpg/{file_name}"
            if member in destinations:
                raise UserError(f"{setid_path} puts image {image_id} in two splits; "
                                "download it again")
            destinations[member] = Path(split_name, str(labels[image_id - 1]), file_name)
    return destinations


def extract_images(archive_path, destinations, target_dir):
    """Copy the wanted members into target_dir in one pass over the archive.

    Members are matched by their exact expected name and must be regular files, and every output
    path is built from the id and label, so absolute names, '..' and links in the archive are never
    followed. One sequential pass matters: seeking back in a .tgz decompresses it from the start.
    """
    remaining = dict(destinations)
    fix = "delete it and run again to download the official archive"
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            for member in archive:
                relative_path = remaining.pop(member.name.removeprefix("./"), None)
                if relative_path is None:
                    continue
                if not member.isfile():
                    raise UserError(f"{archive_path}: {member.name} is not a regular file; {fix}")
                target = target_dir / relative_path
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.extractfile(member) as source, open(target, "wb") as handle:
                    shutil.copyfileobj(source, handle)
                if not remaining:
                    break
    except DAMAGED_ARCHIVE_ERRORS as error:
        raise UserError(f"{archive_path} is damaged or not a .tgz archive ({error_reason(error)}); "
                        f"{fix}") from None
    if remaining:
        missing = sorted(remaining)
        more = f" and {len(missing) - 1} more images" if len(missing) > 1 else ""
        raise UserError(f"{archive_path} lacks {missing[0]}{more}; {fix}")


def arrange(archive_path, labels_path, setid_path, out_dir, split="official", force=False):
    """Sort the archive's images into out_dir/{train,valid,test}/<label>/ and return counts per split.

    The folders are built in a hidden staging folder and moved into place only when complete, so a
    failure or Ctrl-C never leaves half a dataset. Existing split folders are refused unless force.
    """
    out_dir = Path(out_dir)
    if not force:
        refuse_existing_output(out_dir)
    (labels,) = read_mat(labels_path, ["labels"])
    sources = SPLIT_SOURCES[split]
    id_arrays = read_mat(setid_path, [sources[name] for name in SPLITS])
    ids_by_split = dict(zip(SPLITS, id_arrays))
    destinations = plan_destinations(labels, ids_by_split, setid_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".arranging-", dir=out_dir))
    try:
        for name in SPLITS:
            (staging / name).mkdir()
        extract_images(archive_path, destinations, staging)
        for name in SPLITS:
            shutil.rmtree(out_dir / name, ignore_errors=True)
            (staging / name).replace(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.copyfile(CATEGORY_NAMES, out_dir / "cat_to_name.json")
    return {name: len(ids) for name, ids in ids_by_split.items()}


def download_flowers(output, download_dir=None, base_url=OFFICIAL_URL, split="official",
                     force=False):
    """Download (where not done before) and arrange the dataset in output; returns the images
    per split. download_dir: where the three files are kept (default: output/.downloads)."""
    out_dir = Path(output)
    download_dir = Path(download_dir) if download_dir else out_dir / ".downloads"
    if not force:
        refuse_existing_output(out_dir)
    base_url = base_url.rstrip("/")
    paths = [download(f"{base_url}/{name}", download_dir / name)
             for name in (ARCHIVE_NAME, LABELS_NAME, SETID_NAME)]
    print(f"arranging the {split} split into {out_dir}")
    try:
        return arrange(*paths, out_dir, split=split, force=force)
    except OSError as error:
        raise UserError(f"could not write the dataset ({error}); check free disk space and "
                        f"permissions of {out_dir}") from None
