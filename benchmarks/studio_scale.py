"""The studio at 50,000 photos (issue 33): the shared flowers' train/valid/test linked --copies
times under other names (7: 51,590 photos), the real data check on them, then studio.py's server
in a process of its own, measured with httpx and headless Chromium.

    nice -n 10 python benchmarks/studio_scale.py ../shared/data/flowers102 --copies 7

The originals' features go through the backbone once (kept in --cache_dir, as train.py's) and
each copy reuses its original's row: the copies have the same bytes. The check starts from an
empty cache of its own, so it reads every file as a first open does. The links live in a
temporary folder, removed at the end; the shared folder is only read.
"""
import argparse
import gc
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import httpx
import torch

from flower_classifier.cli.studio import serve_studio
from flower_classifier.data.corrections import record_decisions
from flower_classifier.data.folders import find_splits
from flower_classifier.data.split import Dataset
from flower_classifier.data.transforms import eval_transform
from flower_classifier.datacheck.report import check_dataset
from flower_classifier.models.backbones import DEFAULT_ARCH, build_backbone
from flower_classifier.models.features import (
    FeatureExtractor,
    default_cache_dir,
    split_features,
)
from flower_classifier.serve.config import ServeConfig
from flower_classifier.serve.server import listen
from flower_classifier.studio.state import PHOTOS_SHOWN as SHOWN  # cards per gallery page
from flower_classifier.studio.state import Studio, StudioOptions
from flower_classifier.studio.thumbnails import THUMBNAILS_FOLDER, CheckThumbnails

CHROMIUM = "/usr/bin/chromium"  # as tests/test_serve.py launches it
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GOALS = {"page": 1.0, "thumbs": 0.2, "rss": 1.5e9}


def link_copies(data_dir, folder, copies):
    """folder/SPLIT/CLASS/copyK_NAME -> data_dir's file, K = 1..copies; returns the count."""
    count = 0
    for original in sorted(Path(data_dir).resolve().glob("*/*/*")):
        if original.parent.parent.name not in ("train", "valid", "test"):
            continue
        target = folder / original.parent.parent.name / original.parent.name
        target.mkdir(parents=True, exist_ok=True)
        for copy in range(1, copies + 1):
            (target / f"copy{copy}_{original.name}").symlink_to(original)
            count += 1
    names = Path(data_dir) / "cat_to_name.json"
    if names.is_file():
        (folder / "cat_to_name.json").symlink_to(names.resolve())
    return count


def original_features(data_dir, backbone, cache_dir, workers):
    """{split: (features, ok)} of data_dir as open_studio computes them (from the cache)."""
    _, splits = find_splits(data_dir)
    count = sum(len(split.paths) for split in splits.values())
    extractor = FeatureExtractor(backbone, torch.device("cpu"), cache_dir=cache_dir,
                                 workers=workers, images=count)
    return splits, split_features(extractor, splits, eval_transform(backbone.preprocess))


def copied_features(originals, features, splits):
    """The copies' features: each copy's row is its original's (copyK_NAME -> NAME)."""
    copied = {}
    for name, split in splits.items():
        row_of = {(path.parent.name, path.name): row
                  for row, path in enumerate(map(Path, originals[name].paths))}
        rows = torch.tensor([row_of[(Path(path).parent.name, Path(path).name.split("_", 1)[1])]
                             for path in split.paths])
        copied[name] = (features[name][0][rows], features[name][1][rows])
    return copied


def peak_rss():
    """This process's peak resident memory (VmHWM) in bytes."""
    return rss_of("self")["VmHWM"]


def rss_of(pid):
    """{VmRSS, VmHWM} of a process, in bytes."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines
            if line.startswith(("VmRSS", "VmHWM"))}


def timed_check(dataset, features, save_dir, cache_dir, views):
    """(report, seconds, {"peak": peak RSS of this process during the check, "after": its RSS
    once the check's memory is collected}): the peak is reset first. views: CheckThumbnails,
    as open_studio's check makes the thumbnails, or None."""
    Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    report = check_dataset(dataset.class_to_idx, dataset.splits, features, save_dir, cache_dir,
                           views=views)
    seconds, peak = time.perf_counter() - started, peak_rss()
    gc.collect()
    return report, seconds, {"peak": peak, "after": rss_of("self")["VmRSS"]}


def serve(payload, save_dir):
    """The --serve process: studio.py's main after open_studio, on the check saved in payload.
    Prints the time the check's results are in hand (as open_studio returns), then serves."""
    folder, dataset, features, report, thumbnailed = torch.load(payload, weights_only=False)
    backbone = build_backbone(DEFAULT_ARCH)
    print(f"checked at {time.time()}", flush=True)
    options = StudioOptions(folder, save_dir=save_dir, cache_dir=None)
    studio = Studio(options, dataset, features, report, backbone, thumbnailed=thumbnailed)
    serve_studio(studio, ServeConfig(host="127.0.0.1"), listen("127.0.0.1", 0),
                 torch.device("cpu"), "warm")


class Server:
    """This script's --serve in a subprocess; the time its check finished and its address."""

    def __init__(self, payload, save_dir):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(payload), str(save_dir)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.checked = float(self.line("checked at ").split()[-1])
        self.url = re.search(r"http://[\d.]+:\d+", self.line("studio: "))[0]
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def line(self, start):
        for line in self.process.stdout:
            if line.startswith(start):
                return line
        raise SystemExit(f"the studio process ended before saying {start!r}")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def fetch_all(client, ids):
    """Seconds to fetch the thumbnails of ids as the page does: one GET /api/thumbs."""
    started = time.perf_counter()
    answer = client.get("/api/thumbs", params={"ids": ",".join(map(str, ids))})
    answer.raise_for_status()
    assert all(int(length) for length in answer.headers["x-lengths"].split(","))
    return time.perf_counter() - started


def originals_of(state):
    """{(split, class index, original's name): [ids of its copies]} of GET /api/state."""
    copies = {}
    for photo_id, (label, split, name) in enumerate(state["photos"]):
        copies.setdefault((split, label, name.split("_", 1)[1]), []).append(photo_id)
    return copies


def pages_of_unseen_photos(state, pages, first_class, copy=0):
    """pages x SHOWN photo ids, one per original file, from classes first_class onwards: copy 0
    of each (copies share one cached thumbnail: it is keyed by the file the link leads to)."""
    ids = [copies[copy] for (_, label, _), copies in originals_of(state).items()
           if label >= first_class][:pages * SHOWN]
    return [ids[start:start + SHOWN] for start in range(0, len(ids), SHOWN)]


def open_page(page, server, figures):
    """Open the page as soon as the server says where it is: seconds from the check's end to
    body[data-state=ready], and the page's size in memory."""
    started = time.perf_counter()
    page.goto(server.url)
    page.wait_for_selector("body[data-state=ready]", timeout=120000)
    figures["page_load"] = time.perf_counter() - started
    figures["page"] = time.time() - server.checked
    figures["page_heap"] = page.evaluate("performance.memory.usedJSHeapSize")
    figures["page_nodes"] = page.evaluate("document.getElementsByTagName('*').length")


def browser_thumbnails(page, state, figures):
    """Browse a class not looked at yet, until the images on the screen have loaded; then
    SHOWN thumbnails fetched by the page (fetch()) when first asked for, then through other
    links to the same files (the browser's own cache plays no part)."""
    figures["browse"] = browse_classes(page, [row["folder"] for row in state["classes"][30:38]])
    ids = pages_of_unseen_photos(state, 1, 90)[0]
    script = ("async (ids) => { const t = performance.now(); await fetch('api/thumbs?ids=' + "
              "ids.join(',')).then((a) => a.blob()); return (performance.now() - t) / 1000; }")
    figures["browser_cold"] = page.evaluate(script, ids)
    figures["browser_warm"] = page.evaluate(script, pages_of_unseen_photos(state, 1, 90, 1)[0])
    one_each = ("async (ids) => { const t = performance.now(); await Promise.all(ids.map("
                "(id) => fetch('api/photos/' + id + '/thumb').then((a) => a.blob())));"
                " return (performance.now() - t) / 1000; }")
    figures["browser_one_each"] = page.evaluate(one_each, pages_of_unseen_photos(state, 1, 80)[0])


BROWSE = """(folder) => new Promise((resolve) => {
  const menu = document.getElementById('browse-class');
  const started = performance.now();
  menu.value = folder;
  menu.dispatchEvent(new Event('change'));
  const check = () => {
    const shown = [...document.querySelectorAll('#browse-gallery img')].filter((img) => {
      const box = img.getBoundingClientRect(); return box.top < innerHeight && box.bottom > 0; });
    if (shown.length && shown.every((img) => img.complete && img.naturalWidth)) {
      resolve([(performance.now() - started) / 1000, shown.length]);
    } else setTimeout(check, 2);
  };
  check(); })"""


def browse_classes(page, folders):
    """[(seconds, images)] of choosing each class in Browse, timed inside the page: from the
    change until every thumbnail on the screen has loaded (the others load lazily, as the page
    is scrolled). Playwright's own round trips are left out: a person's click has none."""
    page.click("button[data-tab=browse]")
    timings = []
    for folder in folders:
        timings.append(page.evaluate(BROWSE, folder))
        page.wait_for_timeout(300)
    return timings


def client_figures(server, state, save_dir, decisions, figures):
    """GET /api/state (size, best of 3), 3 pages of SHOWN thumbnails first asked for, again,
    and through other links to the same files, and one decision's POST as corrections.json
    grows."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            figures["state_bytes"] = len(client.get("/api/state").content)
            times.append(time.perf_counter() - started)
        figures["state"] = min(times)
        pages = pages_of_unseen_photos(state, 3, 60)
        figures["client_cold"] = [fetch_all(client, ids) for ids in pages]
        figures["client_warm"] = [fetch_all(client, ids) for ids in pages]
        figures["client_copies"] = [fetch_all(client, ids)
                                    for ids in pages_of_unseen_photos(state, 3, 60, 2)]
        figures["decisions"] = [one_decision(client, state, save_dir, count)
                                for count in decisions]


def one_decision(client, state, save_dir, count):
    """(count, seconds, corrections.json's bytes): one POST after count decisions on other
    files (links to one file share its decision: corrections.json keys photos by that file)."""
    corrections = Path(save_dir) / "corrections.json"
    corrections.unlink(missing_ok=True)
    classes, photos = state["classes"], state["photos"]
    ids = [copies[0] for copies in originals_of(state).values()][1:count + 1]  # not photo 0
    paths = [f"{state['folder']}/{photos[i][1]}/{classes[photos[i][0]]['folder']}/{photos[i][2]}"
             for i in ids]
    if paths:
        record_decisions(corrections, dict.fromkeys(paths))
    started = time.perf_counter()
    client.post("/api/decisions", json={"decisions": [{"id": 0, "label": None}]}
                ).raise_for_status()
    return count, time.perf_counter() - started, corrections.stat().st_size


def measure_server(payload, save_dir, decisions, figures):
    """The server's figures: Chromium is started first, so the page opens as soon as the server
    says where it is, as a browser already open would."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900})
        server = None
        try:
            page = browser.new_page()
            page.goto("about:blank")
            server = Server(payload, save_dir)
            open_page(page, server, figures)
            state = httpx.get(server.url + "/api/state", timeout=120).json()
            browser_thumbnails(page, state, figures)
            client_figures(server, state, save_dir, decisions, figures)
            figures["made_ahead"] = made_ahead(save_dir, server.checked)
            figures["browse_ahead"] = browse_classes(
                page, [row["folder"] for row in state["classes"][50:58]])
            figures["rss"] = rss_of(server.process.pid)
        finally:
            browser.close()
            if server:
                server.stop()


def made_ahead(save_dir, since, settle=5, timeout=600):
    """Seconds from the check's end until the thumbnails made ahead (studio.py's warmer: each
    gallery's first page, then every photo) stop growing in number for `settle` seconds."""
    count, changed = -1, time.time()
    while time.time() - changed < settle and time.time() - since < timeout:
        now = thumbnail_cache(save_dir)[0]
        if now != count:
            count, changed = now, time.time()
        time.sleep(0.5)
    return changed - since


def thumbnail_cache(save_dir):
    files = list((Path(save_dir) / THUMBNAILS_FOLDER).glob("*.jpg"))
    return len(files), sum(file.stat().st_size for file in files)


def ms(seconds):
    return f"{seconds * 1000:.0f} ms"


def pages(seconds):
    return ", ".join(map(ms, seconds))


def table_rows(figures):
    """(what, measured, goal) of each figure."""
    thumbs, rss = f"<= {ms(GOALS['thumbs'])}", figures["rss"]
    page_heap = f"{figures['page_heap'] / 1e6:.0f} MB, {figures['page_nodes']}"
    memory = f"{rss['VmHWM'] / 1e9:.2f} GB, {rss['VmRSS'] / 1e9:.2f} GB"
    cache = f"{figures['cache'][0]} files, {figures['cache'][1] / 1e6:.1f} MB"
    state = f"{figures['state_bytes'] / 1e6:.1f} MB in {ms(figures['state'])}"
    check = (f"{figures['check']:.1f} s, RSS peak {figures['check_rss']['peak'] / 1e9:.2f} GB, "
             f"{figures['check_rss']['after'] / 1e9:.2f} GB after it")
    page = f"{figures['page']:.2f} s (of which page load {figures['page_load']:.2f} s)"
    browse, browse_ahead = (
        f"{pages([seconds for seconds, _ in timings])} ({timings[0][1]} images each)"
        for timings in (figures["browse"], figures["browse_ahead"]))
    ahead = (f"{figures['made_ahead']:.0f} s" if figures["at_check"] < figures["cache"][0]
             else "none left: the check made them all")
    return [
        ("data check (empty cache)", check, ""),
        ("page ready after the check", page, f"<= {GOALS['page']:.0f} s"),
        ("GET /api/state", state, ""),
        ("page: JS heap, elements", page_heap, ""),
        ("thumbnails on disk when the check ends", str(figures["at_check"]), ""),
        (f"{SHOWN} thumbnails first asked for, httpx", pages(figures["client_cold"]), thumbs),
        (f"{SHOWN} thumbnails again, httpx", pages(figures["client_warm"]), thumbs),
        (f"{SHOWN} thumbnails via other links", pages(figures["client_copies"]), thumbs),
        (f"{SHOWN} thumbnails first asked for, Chromium", ms(figures["browser_cold"]), thumbs),
        (f"{SHOWN} thumbnails via other links, Chromium", ms(figures["browser_warm"]), thumbs),
        (f"{SHOWN} thumbnails, one request each (before), Chromium",
         ms(figures["browser_one_each"]), ""),
        ("every thumbnail made ahead, after the check", ahead, ""),
        ("Browse a class after that (Chromium, the images on screen)",
         browse_ahead, thumbs),
        ("Browse a class first (Chromium, the images on screen)", browse, thumbs),
        ("server RSS: peak, at the end", memory, f"<= {GOALS['rss'] / 1e9} GB"),
        ("thumbnail cache", cache, ""),
    ] + [(f"one decision, {count} made before",
          f"{ms(seconds)} (corrections.json {size / 1e6:.2f} MB)", "")
         for count, seconds, size in figures["decisions"]]


def print_table(rows):
    width = max(len(row[0]) for row in rows)
    value_width = max(len(row[1]) for row in rows)
    print(f"{'':{width}}  {'measured':{value_width}}  goal")
    for name, value, goal in rows:
        print(f"{name:{width}}  {value:{value_width}}  {goal}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", help="a train/valid/test folder (the shared flowers)")
    parser.add_argument("--copies", type=int, default=7, help="links to each photo")
    parser.add_argument("--cache_dir", default=str(default_cache_dir()),
                        help="where the originals' features are kept")
    parser.add_argument("--workers", type=int, default=2, help="processes decoding images")
    parser.add_argument("--decisions", type=int, nargs="*", default=[0, 1000, 7000])
    parser.add_argument("--no_check_thumbnails", action="store_true",
                        help="the check makes no thumbnails (the studio before issue 33's "
                        "seventh session): pages are decoded when asked for until the "
                        "background has made them")
    args = parser.parse_args()
    backbone = build_backbone(DEFAULT_ARCH)
    originals, features = original_features(args.data_dir, backbone, args.cache_dir,
                                             args.workers)
    figures = {}
    with tempfile.TemporaryDirectory(prefix="studio_scale_") as temporary:
        folder, save_dir = Path(temporary) / "photos", Path(temporary) / "studio"
        count = link_copies(args.data_dir, folder, args.copies)
        dataset = Dataset(*find_splits(folder))
        copies = copied_features(originals, features, dataset.splits)
        print(f"{count} links in {folder}; checking them", flush=True)
        views = CheckThumbnails(save_dir / THUMBNAILS_FOLDER)
        report, figures["check"], figures["check_rss"] = timed_check(
            dataset, copies, save_dir, Path(temporary) / "check_cache",
            None if args.no_check_thumbnails else views)
        figures["at_check"] = thumbnail_cache(save_dir)[0]
        print(f"check: {len(report['exact_duplicates'])} groups of identical files, "
              f"{len(report['near_duplicates'])} near-copies, {len(report['mislabelled'])} "
              "likely mislabelled", flush=True)
        payload = Path(temporary) / "checked.pt"
        torch.save((str(folder), dataset, copies, report, views.kept), payload)
        del report, copies
        measure_server(payload, save_dir, args.decisions, figures)
        figures["cache"] = thumbnail_cache(save_dir)
    print_table(table_rows(figures))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(*sys.argv[2:4])
    else:
        main()
