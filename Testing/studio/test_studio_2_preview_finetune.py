"""MiM Studio end to end: the mask-in-mask preview of a pre-training run (three levels,
three views), then paint a correction with the segment editor and fine-tune 2 steps:
live curves, and the new model listed and selected for Segment."""

from __future__ import annotations

import io

import numpy as np

from mimstudio_testing import load_sample, screenshot, segment_sample, wait_done


def _view_pixels(page, index: int) -> np.ndarray:
    """The index-th visible view as the browser shows it (what the server streamed)."""
    from PIL import Image

    areas = [a for a in page.locator(".display-area").all() if a.is_visible()]
    return np.asarray(Image.open(io.BytesIO(areas[index].screenshot())).convert("L")).astype(float)


def test_preview_shows_three_levels_in_three_views(page):
    if page.inner_text("#volume-name") != "example_ct_sm":  # run alone (else the volume of the segment tests)
        load_sample(page)
    assert "runs/mim" in page.locator("#checkpoint-select").input_value()
    page.click("#pick-center")
    box = page.locator(".display-area").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    page.wait_for_function("document.querySelector('#preview-center').innerText.includes(' mm')")
    page.click("#preview-btn")
    wait_done(page, "preview")
    assert "3 levels" in page.inner_text("#alert")
    page.wait_for_selector("#preview-caption", state="visible")
    page.click("#level-select", force=True)
    levels = page.locator(".v-overlay--active .v-list-item").all_inner_texts()
    page.keyboard.press("Escape")
    assert [t.split(" (")[0] for t in levels] == ["Level 1", "Level 2", "Level 3"]
    page.wait_for_timeout(1500)  # the three views' first images
    for index in range(3):
        pixels = _view_pixels(page, index)
        assert pixels.std() > 5, f"preview view {index} shows a flat image"
    screenshot(page, "03_preview")
    page.click("#layout-segment")


def test_paint_then_finetune_two_steps_adds_the_model(page, studio_data):
    segment_sample(page)  # a fresh result (painting one that was downloaded and exported first: see the note)
    smallest = "document.querySelectorAll('#segment-list .segment-ml')[3]"  # kidney_right: least overlap
    before = float(page.locator("#segment-list .segment-ml").nth(3).inner_text().split()[0])
    page.click("#paint-segment", force=True)
    page.locator(".v-overlay--active .v-list-item").nth(3).click()
    page.click("#paint-btn")
    page.wait_for_selector("#stop-paint-btn", state="visible")
    box = page.locator(".display-area").first.bounding_box()
    x, y = box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.4
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(40):  # a stroke across the abdomen, drawn with the mouse in the streamed view
        page.mouse.move(x + 6 * i, y + 3 * (i % 10))
        page.wait_for_timeout(25)
    page.mouse.up()
    page.wait_for_timeout(500)
    screenshot(page, "04_paint")
    page.click("#stop-paint-btn")
    page.wait_for_function(f"parseFloat({smallest}.innerText) > {before}", timeout=15_000)

    page.fill("#ft-steps", "2")
    page.fill("#ft-name", "studio-tuned")
    page.fill("#ft-spacing", "6")
    page.click("#finetune-btn")
    wait_done(page, "finetune", timeout_s=180)
    assert "studio-tuned" in page.inner_text("#alert")
    assert page.locator("#model-select").input_value().startswith("studio-tuned")
    assert page.inner_text("#ft-last").endswith("studio-tuned")
    assert page.locator("#curve-svg polyline").count() >= 1
    page.locator("#ft-last").scroll_into_view_if_needed()  # the curves, at the bottom of the panel
    screenshot(page, "05_finetuned")
    page.click("#model-select", force=True)
    listed = page.locator(".v-overlay--active .v-list-item").all_inner_texts()
    page.keyboard.press("Escape")
    assert any(t.startswith("studio-tuned (") for t in listed) and any(t.startswith(studio_data.model) for t in listed)
    assert (studio_data.models / "studio-tuned" / "model.json").is_file()
