"""MiM Studio end to end, in headless Chromium against a live server: load the sample CT,
Segment with a tiny model, see the overlay (in the page, and in the pixels the server
rendered: slice overlay and 3D surface), download the ``.seg.nrrd`` and the NIfTI and check
they lie on the CT's grid; then Cancel a running job and find no process left."""

from __future__ import annotations

import io
import json
import re
import time

import numpy as np

from mimstudio_testing import SCREENSHOTS, descendants, download, load_sample, screenshot, segment_sample, wait_done


def _colourful_pixels(png: bytes) -> int:
    """Pixels whose R, G, B differ by more than 40: a CT alone is grey."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 40).sum())


def test_load_sample_segment_and_download(page, studio, studio_data, tmp_path):
    assert page.locator("#volume-select").input_value() == "Sample: example_ct_sm.nii.gz (CT)"  # the first
    load_sample(page)
    assert page.inner_text("#volume-name") == "example_ct_sm"
    # the segment layout's four views, each once (a view created while the page was built used to be
    # placed a second time below the layout, and its two copies fought over the view's size)
    assert page.locator(".display-area").count() == 4
    before = _colourful_pixels(download(page, "#download-png").path().read_bytes())
    assert before < 50, f"the CT alone should render grey, {before} coloured pixels"
    screenshot(page, "01_loaded")

    assert page.locator("#model-select").input_value().startswith(studio_data.model)
    assert page.locator("#segment-fast").is_checked()  # the server runs on the CPU (--device cpu)
    page.click("#segment-btn")
    wait_done(page, "segment")
    # mim segment --fast ran: fp32 in OpenVINO (make setup installs it), the reference path's labels
    assert "segments (fast, network in OpenVINO fp32)" in page.inner_text("#alert"), page.inner_text("#alert")
    names = page.locator("#segment-list .segment-name").all_inner_texts()
    assert names == ["liver", "spleen", "kidney_left", "kidney_right"]
    sizes = [float(t.split()[0]) for t in page.locator("#segment-list .segment-ml").all_inner_texts()]
    assert sum(sizes) > 0, "every segment is empty"
    colours = page.locator("#segment-list .mim-swatch").evaluate_all("e => e.map(x => x.style.background)")
    table = json.loads((studio_data.models / studio_data.model / "model.json").read_text())["labels"]
    assert colours == ["rgb({}, {}, {})".format(*entry["color"]) for entry in table]  # the model's colours
    for index, what in ((0, "the slice overlay"), (1, "the 3D surface")):  # as the browser received them
        area = page.locator(".display-area").nth(index)
        deadline = time.monotonic() + 20
        while _colourful_pixels(area.screenshot()) < 500:
            assert time.monotonic() < deadline, f"the page does not show {what}"
            page.wait_for_timeout(250)
    screenshot(page, "02_segmented")

    png = download(page, "#download-png")
    assert png.suggested_filename == "axial.png"
    coloured = _colourful_pixels(png.path().read_bytes())
    assert coloured > 500, f"the server-rendered axial view shows no coloured overlay ({coloured} pixels)"
    surface = download(page, "#download-3d-png").path().read_bytes()
    assert _colourful_pixels(surface) > 500, "the server-rendered 3D view shows no segment surface"
    SCREENSHOTS.mkdir(exist_ok=True)
    (SCREENSHOTS / "02b_3d_view_server_side.png").write_bytes(surface)

    seg = download(page, "#download-seg")
    assert seg.suggested_filename == "example_ct_sm.seg.nrrd"
    seg_path = tmp_path / seg.suggested_filename
    seg.save_as(seg_path)
    nifti = download(page, "#download-nifti")
    nifti_path = tmp_path / nifti.suggested_filename
    nifti.save_as(nifti_path)

    import SimpleITK as sitk

    ct = sitk.ReadImage(str(studio_data.ct))
    for path in (seg_path, nifti_path):
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == ct.GetSize(), path.name
        np.testing.assert_allclose(image.GetSpacing(), ct.GetSpacing(), atol=1e-4, err_msg=path.name)
        np.testing.assert_allclose(image.GetOrigin(), ct.GetOrigin(), atol=1e-3, err_msg=path.name)
        np.testing.assert_allclose(image.GetDirection(), ct.GetDirection(), atol=1e-5, err_msg=path.name)
    text = seg_path.read_bytes()[:20000].decode("latin-1")
    assert re.search(r"Segment0_Name:=liver", text), "the .seg.nrrd lost the segment names"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti_path)))
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}


def test_cancel_a_running_finetune_leaves_no_process(page, studio, studio_data):
    """After Segment (the previous test), a long fine-tuning is cancelled while its child trains."""
    if not page.locator("#segment-list .segment-item").count():
        segment_sample(page)
    assert descendants(studio.process.pid) == []
    page.fill("#ft-steps", "5000")
    page.fill("#ft-name", "never-finished")
    page.fill("#ft-spacing", "6")
    page.click("#finetune-btn")
    page.wait_for_selector("#finetune-cancel", state="visible")
    deadline = time.monotonic() + 30
    while not descendants(studio.process.pid):
        assert time.monotonic() < deadline, "no child process while fine-tuning"
        time.sleep(0.1)
    time.sleep(2)  # the child is importing torch, reading the case, training: kill it mid-way
    assert descendants(studio.process.pid), "the fine-tuning job ended on its own"
    page.click("#finetune-cancel")
    page.wait_for_function("document.querySelector('#finetune-status').innerText === 'Cancelled.'")
    deadline = time.monotonic() + 15
    while descendants(studio.process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert descendants(studio.process.pid) == [], "processes left after Cancel"
    assert not (studio_data.models / "never-finished").exists()
    page.wait_for_selector("#finetune-btn:not([disabled])")
    page.fill("#ft-steps", "2")
    page.fill("#ft-name", "")
