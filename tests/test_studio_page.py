"""The studio's page in headless Chromium on a phone's screen, driving the whole loop on a small
folder of real photos with a planted duplicate: open, drop the duplicate, relabel a primrose of valid/ as a globe thistle (the retrained head's mistake), keep
one with a key, retrain, read the new accuracy, open a mistake's heatmap; the decisions are in
corrections.json as the page showed them."""
import json
import os

import pytest
from test_serve import CHROMIUM, CHROMIUM_ARGS, browser_missing
from test_studio import Studio, ids, make_folder


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio_page")
    server = Studio(make_folder(root / "photos"), root / "save", root / "cache")
    yield server, root / "save"
    server.stop()


def open_browser(playwright, profile):
    return playwright.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS,
        viewport={"width": 390, "height": 844}, has_touch=True)


def drive(page, url, copy, relabelled, kept):
    """The loop on the page; returns (the accuracy line, the heatmap's natural width)."""
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_selector("body[data-state=ready]", timeout=30000)
    assert page.locator("#class-table tbody tr").first.inner_text().startswith("pink primrose")
    page.click("button[data-tab=duplicates]")
    page.locator(f"#duplicates .card[data-id='{copy}'] button[data-action=drop]").click()
    page.wait_for_selector(f"#duplicates .card[data-id='{copy}'].dropped", timeout=30000)
    page.click("button[data-tab=browse]")
    page.select_option("#browse-class", "1")
    card = page.locator(f"#browse-gallery .card[data-id='{relabelled}']")
    card.locator("select.relabel").select_option("10")
    page.wait_for_selector(f"#browse-gallery .card[data-id='{relabelled}'].relabelled",
                           timeout=30000)
    page.locator(f"#browse-gallery .card[data-id='{kept}']").focus()
    page.keyboard.press("k")
    page.wait_for_selector(f"#browse-gallery .card[data-id='{kept}'].kept", timeout=30000)
    page.click("button[data-tab=retrain]")
    page.click("#retrain-button")
    page.wait_for_selector("#retrain-progress[data-status=done]", timeout=120000)
    accuracy = page.inner_text("#retrain-progress")
    page.wait_for_selector("#mistakes .card", timeout=30000)
    mistake = page.locator(f"#mistakes .card[data-id='{relabelled}'] img")
    mistake.click()
    page.wait_for_selector("#viewer-heatmap[data-loaded=true]", timeout=60000)
    width = page.evaluate("document.getElementById('viewer-heatmap').naturalWidth")
    assert not errors, errors
    return accuracy, width


def test_the_whole_loop_in_headless_chromium_on_a_phone(studio, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        browser_missing(f"playwright is not installed ({error})")
    if not os.access(CHROMIUM, os.X_OK):
        browser_missing(f"{CHROMIUM} is missing (Debian package chromium)")
    server, save_dir = studio
    state = server.client.get("/api/state").json()
    copy = ids(state, "copy_of_primrose.jpg")[0]
    primroses = [i for i, photo in enumerate(state["photos"]) if photo[0] == 0]
    relabelled = next(i for i in primroses if state["photos"][i][1] == "valid")
    kept = next(i for i in primroses if state["photos"][i][1] == "train")
    with sync_playwright() as playwright:
        browser = open_browser(playwright, tmp_path / "profile")
        try:
            page = browser.new_page()
            accuracy, width = drive(page, server.url, copy, relabelled, kept)
            page.screenshot(path=str(tmp_path / "studio.png"), full_page=True)
        finally:
            browser.close()
    assert accuracy.startswith("New valid accuracy: ") and accuracy.endswith(" s)")
    assert width == 224  # the heatmap over the centre crop
    decisions = json.loads((save_dir / "corrections.json").read_text())["decisions"]
    labels = sorted((entry["label"] or "") for entry in decisions.values())
    assert labels == ["", "1", "10"]  # dropped, kept as filed, relabelled
    runs = server.client.get("/api/runs").json()["runs"]
    assert runs[-1]["changes"]["dropped"] == 1 and runs[-1]["changes"]["relabelled"] == 1
    assert any(m["id"] == relabelled for m in runs[-1]["mistakes"])
