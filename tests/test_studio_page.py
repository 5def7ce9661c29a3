"""The studio's page in headless Chromium on a phone's screen, driving the whole loop on a small
folder of real photos with a planted duplicate and three misfiled photos: open (the studio
trains on the folder as filed), relabel the three suspects, drop the duplicate, relabel a
primrose of valid/ as a globe thistle (the retrained head's mistake), keep one with a key,
confirm a batch of new photos (--unlabelled) as the class suggested, retrain, see the valid
accuracy change, open a mistake's heatmap, download the model and load it, train the final
model and try it on serve.py's camera page; the decisions are in corrections.json as the page
showed them."""
import json
import os
import time

import pytest
from test_serve import CHROMIUM, CHROMIUM_ARGS, browser_missing
from conftest import FLOWERS, link_class_folders
from test_studio import CLASSES, FINAL_FLAGS, NAMES, Studio, ids, make_folder, onnx_metadata


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio_page")
    new = link_class_folders(root / "new", 2, CLASSES, FLOWERS / "valid")  # not in photos/
    server = Studio(make_folder(root / "photos"), root / "save", root / "cache",
                    "--unlabelled", new, *FINAL_FLAGS)
    yield server, root / "save"
    server.stop()


def open_browser(playwright, profile):
    return playwright.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS,
        viewport={"width": 390, "height": 844}, has_touch=True)


def retrain(page, run):
    """Click the quick retrain and wait for run number `run` to be done."""
    page.click("button[data-tab=retrain]")
    page.click("#retrain-button")
    page.wait_for_selector(f"#runs tbody tr:nth-child({run})", timeout=30000)
    page.wait_for_selector("#retrain-progress[data-status=done]", timeout=120000)


def drive(page, url, suspects, copy, relabelled, kept, downloads, photo_of_class):
    """The loop on the page; returns {accuracy: the accuracy line, runs: the runs table's text,
    width: the heatmap's natural width, model: the downloaded model file, added: the ids of
    the new photos confirmed, final: the final model's line, camera: the headline of serve.py's
    page for photo_of_class}."""
    errors, thumbnails = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: "thumb" in request.url and thumbnails.append(request.url))
    page.goto(url)
    page.wait_for_selector("body[data-state=ready]", timeout=30000)
    assert page.locator("#class-table tbody tr").first.inner_text().startswith("pink primrose")
    page.click("button[data-tab=retrain]")  # the folder as filed: trained as the studio opens
    page.wait_for_selector("#retrain-progress[data-status=done]", timeout=120000)
    page.click("button[data-tab=suspects]")
    accept = page.locator("#suspects button.accept")
    assert accept.count() == len(suspects)
    for button in accept.all():
        assert button.inner_text().startswith("Relabel as ")
        button.click()
    for suspect in suspects:
        page.wait_for_selector(f"#suspects .card[data-id='{suspect}'].relabelled", timeout=30000)
    page.click("button[data-tab=duplicates]")
    page.locator(f"#duplicates .card[data-id='{copy}'] button[data-action=drop]").click()
    page.wait_for_selector(f"#duplicates .card[data-id='{copy}'].dropped", timeout=30000)
    page.click("button[data-tab=browse]")
    page.select_option("#browse-class", "1")
    # Not wait_for_function: its polling evaluates a string, which the page's CSP forbids.
    first = page.locator("#browse-gallery img").first
    deadline = time.monotonic() + 30
    while not first.evaluate("(img) => img.naturalWidth > 0"):
        assert time.monotonic() < deadline, "the gallery's first thumbnail did not load"
        page.wait_for_timeout(50)
    # A gallery's thumbnails come in one request, not one per card.
    shown = page.evaluate("[...document.querySelectorAll('#browse-gallery .card')]"
                          ".map((card) => card.dataset.id).join(',')")
    assert thumbnails[-1].endswith("/api/thumbs?ids=" + shown)
    assert all("/api/thumbs?ids=" in url for url in thumbnails)
    card = page.locator(f"#browse-gallery .card[data-id='{relabelled}']")
    menu = card.locator("select.relabel")
    assert menu.locator("option").count() == 1  # the classes come when the menu is reached
    menu.tap()
    assert menu.locator("option").count() == 1 + len(page.evaluate("S.classes"))
    menu.select_option("10")
    page.wait_for_selector(f"#browse-gallery .card[data-id='{relabelled}'].relabelled",
                           timeout=30000)
    kept_card = page.locator(f"#browse-gallery .card[data-id='{kept}']")
    kept_card.focus()
    page.keyboard.press("k")
    page.wait_for_selector(f"#browse-gallery .card[data-id='{kept}'].kept", timeout=30000)
    kept_card.focus()
    page.keyboard.press("r")  # the keyboard reaches the relabel menu, which gets the classes
    assert kept_card.locator("select.relabel option").count() == 1 + len(
        page.evaluate("S.classes"))
    kept_card.focus()  # away from the menu, unchanged
    page.click("button[data-tab=label]")
    batch = page.locator("#label .batch").first
    batch.wait_for(timeout=30000)
    added = [int(i) for i in batch.locator(".card").evaluate_all(
        "cards => cards.map((card) => card.dataset.id)")]
    batch.locator("button.confirm").click()
    for photo in added:
        page.wait_for_selector(f"#label .card[data-id='{photo}'].added", timeout=30000)
    retrain(page, 2)  # with the decisions
    accuracy, runs = page.inner_text("#retrain-progress"), page.inner_text("#runs")
    page.click("#final-button")  # train.py in its own process, while the loop goes on
    mistake = page.locator(f"#mistakes .card[data-id='{relabelled}'] img")
    mistake.click()
    page.wait_for_selector("#viewer-heatmap[data-loaded=true]", timeout=60000)
    width = page.evaluate("document.getElementById('viewer-heatmap').naturalWidth")
    page.keyboard.press("Escape")
    with page.expect_download(timeout=120000) as started:
        page.click("#download-model")
    model = downloads / started.value.suggested_filename
    started.value.save_as(model)
    page.wait_for_selector("#final-progress[data-status=done]", timeout=300000)
    final = page.inner_text("#final-progress")
    page.click("#camera-button")  # serve.py's page on the final model, as a phone opens it
    camera = page.wait_for_selector("#camera-link a", timeout=120000).get_attribute("href")
    phone = page.context.new_page()
    phone.goto(camera)
    phone.set_input_files("#picker", str(photo_of_class))
    phone.wait_for_selector("body[data-state=done]", timeout=60000)
    named = phone.inner_text("#headline")
    assert not errors, errors
    return {"accuracy": accuracy, "runs": runs, "width": width, "model": model, "added": added,
            "final": final, "camera": named}


def test_the_whole_loop_in_headless_chromium_on_a_phone(studio, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        browser_missing(f"playwright is not installed ({error})")
    if not os.access(CHROMIUM, os.X_OK):
        browser_missing(f"{CHROMIUM} is missing (Debian package chromium)")
    import numpy as np
    import onnxruntime

    server, save_dir = studio
    state = server.client.get("/api/state").json()
    copy = ids(state, "copy_of_primrose.jpg")[0]
    suspects = [item["id"] for item in state["findings"]["mislabelled"]]
    primroses = [i for i, photo in enumerate(state["photos"]) if photo[0] == 0
                 and i not in suspects]
    relabelled = next(i for i in primroses if state["photos"][i][1] == "valid")
    kept = next(i for i in primroses if state["photos"][i][1] == "train")
    with sync_playwright() as playwright:
        browser = open_browser(playwright, tmp_path / "profile")
        try:
            page = browser.new_page()
            thistle = sorted((FLOWERS / "valid" / "10").iterdir())[-1]
            seen = drive(page, server.url, suspects, copy, relabelled, kept, tmp_path, thistle)
            page.screenshot(path=str(tmp_path / "studio.png"), full_page=True)
        finally:
            browser.close()
    accuracy, model = seen["accuracy"], seen["model"]
    assert accuracy.startswith("New valid accuracy: ") and accuracy.endswith(" s)")
    assert seen["width"] == 224  # the heatmap over the centre crop
    assert seen["final"].startswith("Final model: valid accuracy ") and str(
        save_dir / "final" / "checkpoint.pth") in seen["final"]
    # serve.py's page named the photo with the final model's classes
    assert any(name in seen["camera"] for name in NAMES.values()), seen["camera"]
    decisions = json.loads((save_dir / "corrections.json").read_text())["decisions"]
    labels = sorted((entry["label"] or "") for entry in decisions.values() if "split" not in entry)
    # dropped, kept as filed and relabelled; the suspects relabelled to the classes they show
    assert labels == ["", "1", "1", "10", "10", "2"]
    new_photos = [(key, entry) for key, entry in decisions.items() if "split" in entry]
    assert len(new_photos) == len(seen["added"]) >= 1
    # one batch: one predicted class, confirmed for all, into train/
    assert {entry["label"] for _, entry in new_photos} < set(CLASSES)
    assert {entry["split"] for _, entry in new_photos} == {"train"}
    runs = server.client.get("/api/runs").json()["runs"]
    assert runs[-1]["changes"]["dropped"] == 1 and runs[-1]["changes"]["relabelled"] == 4
    assert runs[-1]["changes"]["added"] == len(seen["added"])
    assert "{0} (+{0}) added".format(len(seen["added"])) in seen["runs"]
    assert any(m["id"] == relabelled for m in runs[-1]["mistakes"])
    shown = [f"{100 * run['valid_accuracy']:.1f}%" for run in runs]
    assert shown[0] != shown[1] and all(value in seen["runs"] for value in shown)
    assert model.name == "photos-run-2.onnx"
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    metadata = onnx_metadata(model)
    assert metadata["names"] == [NAMES[name] for name in CLASSES]
    (probabilities, *_) = session.run(None, {"pixels": np.zeros((1, 224, 224, 3), np.uint8)})
    assert probabilities.shape == (1, len(CLASSES))
