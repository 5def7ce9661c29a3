"""download_flowers.py on a fake 12-image Oxford-102 (3 classes) made in tmp_path; no internet."""
import http.server
import io
import json
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from flower_classifier.cli.download_flowers import get_args_parser, main
from flower_classifier.data.download import arrange
from flower_classifier.utils.errors import UserError

PROJECT_ROOT = Path(__file__).parents[1]
LABELS = [1, 2, 3] * 4                      # image_00001 -> class 1, image_00002 -> class 2, ...
SET_IDS = {"trnid": [1, 2, 3], "valid": [4, 5, 6], "tstid": [7, 8, 9, 10, 11, 12]}


def jpeg_bytes(image_id):
    """A tiny JPEG whose colour differs per image, so a mixed-up copy would show."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (image_id * 20, 255 - image_id * 20, 0)).save(buffer, "JPEG")
    return buffer.getvalue()


def add_member(archive, name, data=b"", kind=tarfile.REGTYPE, link=""):
    member = tarfile.TarInfo(name)
    member.size, member.type, member.linkname = len(data), kind, link
    archive.addfile(member, io.BytesIO(data))


def write_archive(path, names):
    with tarfile.open(path, "w:gz") as archive:
        for image_id, name in enumerate(names, start=1):
            add_member(archive, name, jpeg_bytes(image_id))
    return path


@pytest.fixture
def raw_files(tmp_path):
    """The three official files, faked, in one folder: (archive, labels, setid)."""
    folder = tmp_path / "raw"
    folder.mkdir()
    names = [f"jpg/image_{image_id:05d}.jpg" for image_id in range(1, len(LABELS) + 1)]
    archive = write_archive(folder / "102flowers.tgz", names)
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": np.array([LABELS], dtype=np.uint8)})
    scipy.io.savemat(folder / "setid.mat", {key: np.array([ids]) for key, ids in SET_IDS.items()})
    return archive, folder / "imagelabels.mat", folder / "setid.mat"


def expected_layout(split_of_ids):
    """{relative path: image id} that train.py should find for the given split -> ids mapping."""
    return {f"{split}/{LABELS[image_id - 1]}/image_{image_id:05d}.jpg": image_id
            for split, ids in split_of_ids.items() for image_id in ids}


def assert_layout(out_dir, split_of_ids):
    found = {path.relative_to(out_dir).as_posix() for split in ("train", "valid", "test")
             for path in (out_dir / split).rglob("*") if path.is_file()}
    layout = expected_layout(split_of_ids)
    assert found == set(layout)
    for relative_path, image_id in layout.items():
        assert (out_dir / relative_path).read_bytes() == jpeg_bytes(image_id)
    assert (json.loads((out_dir / "cat_to_name.json").read_text())
            == json.loads((PROJECT_ROOT / "cat_to_name.json").read_text()))
    assert not [path for path in out_dir.iterdir() if path.name.startswith(".arranging")]


def run_main(*argv):
    main(get_args_parser().parse_args([str(arg) for arg in argv]))


def test_arrange_official_split(raw_files, tmp_path):
    counts = arrange(*raw_files, tmp_path / "flowers")
    assert counts == {"train": 3, "valid": 3, "test": 6}
    assert_layout(tmp_path / "flowers", {"train": SET_IDS["trnid"], "valid": SET_IDS["valid"],
                                         "test": SET_IDS["tstid"]})


def test_arrange_swap_split_trains_on_the_test_ids(raw_files, tmp_path):
    counts = arrange(*raw_files, tmp_path / "flowers", split="swap")
    assert counts == {"train": 6, "valid": 3, "test": 3}
    assert_layout(tmp_path / "flowers", {"train": SET_IDS["tstid"], "valid": SET_IDS["valid"],
                                         "test": SET_IDS["trnid"]})


def test_main_downloads_through_base_url_then_reuses_the_files(raw_files, tmp_path, capsys):
    out_dir = tmp_path / "flowers"
    base_url = raw_files[0].parent.as_uri()
    run_main("--output", out_dir, "--base_url", base_url)
    assert_layout(out_dir, {"train": SET_IDS["trnid"], "valid": SET_IDS["valid"],
                            "test": SET_IDS["tstid"]})
    downloads = out_dir / ".downloads"
    assert sorted(path.name for path in downloads.iterdir()) == [
        "102flowers.tgz", "imagelabels.mat", "setid.mat"]
    assert "done: 3 train, 3 valid and 6 test images" in capsys.readouterr().out

    # A second run must not download again: the base URL now points nowhere.
    run_main("--output", out_dir, "--base_url", tmp_path / "nowhere", "--force", "--split", "swap")
    assert "using" in capsys.readouterr().out
    assert_layout(out_dir, {"train": SET_IDS["tstid"], "valid": SET_IDS["valid"],
                            "test": SET_IDS["trnid"]})


def unused_local_port():
    """A port on 127.0.0.1 that nothing listens on, so connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cli(*argv):
    """download_flowers.py as a user runs it: (exit code, stderr)."""
    result = subprocess.run([sys.executable, "download_flowers.py", *map(str, argv)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    return result.returncode, result.stderr


def assert_one_error_line(returncode, stderr):
    """A user error: exit code 2 and one `error:` line, never a traceback."""
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")


def test_offline_run_fails_with_one_line_and_no_half_file(tmp_path):
    out_dir = tmp_path / "flowers"
    returncode, stderr = run_cli("--output", out_dir,
                                 "--base_url", f"http://127.0.0.1:{unused_local_port()}/")
    assert_one_error_line(returncode, stderr)
    assert "could not download" in stderr and "102flowers.tgz" in stderr
    assert not any(path.is_file() for path in out_dir.rglob("*"))


class TruncatingHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes, sends 10 and hangs up: a connection that drops mid-download."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"0123456789")

    def log_message(self, *args):
        pass


def test_broken_download_leaves_no_file_under_the_final_name(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), TruncatingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserError, match="could not download"):
            run_main("--output", tmp_path / "flowers",
                     "--base_url", f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    assert list((tmp_path / "flowers" / ".downloads").iterdir()) == []


@pytest.mark.parametrize("hostile_name", ["../jpg/image_00005.jpg", "/jpg/image_00005.jpg"])
def test_archive_without_the_requested_member_is_refused(raw_files, tmp_path, hostile_name):
    names = [f"jpg/image_{image_id:05d}.jpg" for image_id in range(1, len(LABELS) + 1)]
    names[4] = hostile_name
    archive = write_archive(tmp_path / "hostile.tgz", names)
    with pytest.raises(UserError, match="lacks jpg/image_00005.jpg"):
        arrange(archive, *raw_files[1:], tmp_path / "out" / "flowers")
    assert not (tmp_path / "jpg").exists() and not (tmp_path / "out" / "jpg").exists()
    assert not (tmp_path / "out" / "flowers" / "train").exists()


def test_link_in_place_of_an_image_is_refused(raw_files, tmp_path):
    archive = tmp_path / "linked.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        add_member(tar, "jpg/image_00001.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
    with pytest.raises(UserError, match="not a regular file"):
        arrange(archive, *raw_files[1:], tmp_path / "flowers")


@pytest.mark.parametrize("damaged", [0, 1, 2])
def test_damaged_download_is_named(raw_files, tmp_path, damaged):
    raw_files[damaged].write_bytes(b"<html>not found</html>")
    with pytest.raises(UserError, match=f"{raw_files[damaged].name} is damaged"):
        arrange(*raw_files, tmp_path / "flowers")


@pytest.mark.parametrize("damaged", [0, 1, 2])
def test_damaged_download_on_the_command_line_is_one_line_and_exit_code_2(raw_files, tmp_path,
                                                                         damaged):
    raw_files[damaged].write_bytes(b"<html>not found</html>")  # kept: not downloaded again
    returncode, stderr = run_cli("--output", tmp_path / "flowers", "--download_dir",
                                 raw_files[0].parent, "--base_url", tmp_path / "nowhere")
    assert_one_error_line(returncode, stderr)
    assert f"{raw_files[damaged].name} is damaged" in stderr and "run again" in stderr
