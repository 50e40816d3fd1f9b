"""MiM Studio end to end: the mask-in-mask preview of a pre-training run (three levels,
three views), then paint a correction with the segment editor, add it as a fine-tuning case,
load and segment a second CT and add it too, and fine-tune 2 steps on both cases: live
curves, and the new model (trained on 2 cases) listed and selected for Segment."""

from __future__ import annotations

import io
import json
import time

import numpy as np

from mimstudio_testing import download, load_sample, screenshot, segment_sample, visible_views, wait_done, wait_layout


def _view_pixels(page, index: int) -> np.ndarray:
    """The index-th visible view as the browser shows it (what the server streamed)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(visible_views(page)[index].screenshot())).convert("L")).astype(float)


def _label_voxels(downloaded, path, value: int) -> int:
    import SimpleITK as sitk

    downloaded.save_as(path)
    return int((sitk.GetArrayFromImage(sitk.ReadImage(str(path))) == value).sum())


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
    wait_layout(page, 3)
    page.click("#level-select", force=True)
    levels = page.locator(".v-overlay--active .v-list-item").all_inner_texts()
    page.keyboard.press("Escape")
    assert [t.split(" (")[0] for t in levels] == ["Level 1", "Level 2", "Level 3"]
    page.wait_for_timeout(1500)  # the three views' first images
    for index in range(3):
        pixels = _view_pixels(page, index)
        assert pixels.std() > 5, f"preview view {index} shows a flat image"
    screenshot(page, "03_preview")
    assert not page.locator("#volume-index-select").is_visible()  # level 1 is one volume

    # level 2: four volumes, the one nearest the centre shown first; another one changes the views
    page.click("#level-select", force=True)
    page.locator(".v-overlay--active .v-list-item", has_text="Level 2").click()
    page.wait_for_selector("#volume-index-select", state="visible")
    page.wait_for_timeout(1500)
    shown = _view_pixels(page, 2)  # the original
    page.click("#volume-index-select", force=True)
    volumes = page.locator(".v-overlay--active .v-list-item").all_inner_texts()
    assert [t.split(" ")[0] for t in volumes] == ["L2.00", "L2.01", "L2.02", "L2.03"], volumes
    nearest = [i for i, t in enumerate(volumes) if "nearest the centre" in t]
    assert len(nearest) == 1
    other = (nearest[0] + 1) % 4
    page.locator(".v-overlay--active .v-list-item").nth(other).click()
    deadline = time.monotonic() + 15
    while np.abs(_view_pixels(page, 2) - shown).mean() < 1.0:  # another region of the CT
        assert time.monotonic() < deadline, "choosing another volume of the level did not change the views"
        page.wait_for_timeout(250)
    assert page.locator("#volume-index-select").input_value().startswith(f"L2.0{other}")
    screenshot(page, "03b_preview_level2")


def test_paint_then_finetune_two_steps_adds_the_model(page, studio_data, tmp_path):
    """Correct a segmentation that was already downloaded (its .seg.nrrd written from the live
    node), starting from the preview's views: Paint brings back the CT's views."""
    if not page.locator("#segment-list .segment-item").count():  # run alone
        segment_sample(page)
    download(page, "#download-seg")  # the .seg.nrrd is written from the live node
    kidney_before = _label_voxels(download(page, "#download-nifti"), tmp_path / "before.nii.gz", 4)
    smallest = "document.querySelectorAll('#segment-list .segment-ml')[3]"  # kidney_right: least overlap
    before = float(page.locator("#segment-list .segment-ml").nth(3).inner_text().split()[0])
    page.click("#paint-segment", force=True)
    page.locator(".v-overlay--active .v-list-item").nth(3).click()
    page.click("#paint-btn")
    page.wait_for_selector("#stop-paint-btn", state="visible")
    wait_layout(page, 4)  # Paint switched to the segment views (axial, 3D, coronal, sagittal)
    assert "v-btn--active" in page.locator("#layout-segment").get_attribute("class")
    box = visible_views(page)[0].bounding_box()
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
    kidney_after = _label_voxels(download(page, "#download-nifti"), tmp_path / "after.nii.gz", 4)
    assert kidney_after > kidney_before, "the downloaded label map does not hold the stroke"

    cases_text = "document.querySelector('#cases-text').innerText"
    page.click("#add-case-btn")
    page.wait_for_function(f"{cases_text}.startsWith('1 case')", timeout=10_000)
    # a second case: the data folder's CT (another file; Load keeps the first case in the scene), segmented
    page.click("#volume-select", force=True)
    page.locator(".v-overlay--active .v-list-item", has_text="Data: ct_small.nii.gz").click()
    page.click("#load-btn")
    page.wait_for_function("document.querySelector('#alert').innerText.includes('Loaded ct_small')",
                           timeout=30_000)
    page.click("#segment-btn")
    wait_done(page, "segment")
    page.click("#add-case-btn")
    page.wait_for_function(f"{cases_text}.startsWith('2 cases')", timeout=10_000)
    assert [t.split(". ", 1)[1].split(" - ")[0] for t in page.locator("#case-list .case-name").all_inner_texts()] \
        == ["example_ct_sm", "ct_small"]

    page.fill("#ft-steps", "2")
    page.fill("#ft-name", "studio-tuned")
    page.fill("#ft-spacing", "6")
    page.click("#finetune-btn")
    wait_done(page, "finetune", timeout_s=180)
    assert "studio-tuned" in page.inner_text("#alert") and "(2 cases)" in page.inner_text("#alert")
    assert page.locator("#model-select").input_value().startswith("studio-tuned")
    assert page.inner_text("#ft-last").endswith("studio-tuned")
    assert page.locator("#curve-svg polyline").count() >= 1
    page.locator("#ft-last").scroll_into_view_if_needed()  # the curves, at the bottom of the panel
    screenshot(page, "05_finetuned")
    page.click("#model-select", force=True)
    listed = page.locator(".v-overlay--active .v-list-item").all_inner_texts()
    page.keyboard.press("Escape")
    assert any(t.startswith("studio-tuned (") for t in listed) and any(t.startswith(studio_data.model) for t in listed)
    description = json.loads((studio_data.models / "studio-tuned" / "model.json").read_text(encoding="utf-8"))
    assert description["training"]["train_cases"] == 2  # the job's datalist held both cases
    for remaining in (1, 0):  # the list empties: Fine-tune is back to the current case
        page.locator("#case-list .case-remove").first.click()
        page.wait_for_function(f"document.querySelectorAll('#case-list .case-item').length === {remaining}",
                               timeout=10_000)
    assert page.inner_text("#cases-text").startswith("No case added")
