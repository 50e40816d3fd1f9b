"""Render the extension's screenshot (Resources/Screenshots/MiMSlicer-segment.png) from real
results, offscreen, with Slicer's own MRML views.

1. ``mim data samples``: the sample CTs (fetched and verified by sha256).
2. ``mim finetune``: a ``tiny`` MiM segmentation network trained from scratch for 600
   steps at 6 x 6 x 4 mm on the two labelled sample CTs (liver, spleen; ``--steps``;
   skipped with ``--model``).
3. ``mim segment --seg-nrrd``: the whole sample CT ``example_ct.nii.gz`` segmented by that
   model (the labelled ``example_ct_sm`` is 30 of its 112 slices).
4. slicer-core + trame-slicer: the CT and the segmentation loaded into an MRML scene
   with Slicer's storage nodes, shown in axial / coronal / sagittal slice views and a 3D
   view (closed surfaces) rendered offscreen (EGL or OSMesa; no display needed), then
   laid out like Slicer's four-up view with a caption saying what produced it.

    pip install "trame-slicer[standalone]==2.0.0"             # once: the offscreen views
    python Resources/render_screenshot.py                     # ~4 min on 2 CPU cores
    python Resources/render_screenshot.py --model runs/seg/model

Everything runs the real ``mim`` command line in child processes, as a user would.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "Screenshots" / "MiMSlicer-segment.png"
VIEW_SIZE = 480  # pixels per view; the image is 2 x 2 views plus a caption
CAPTION_HEIGHT = 84


def mim(*args: str) -> str:
    print("$ mim " + " ".join(args), flush=True)
    # one CPU thread: for this tiny network on a small shared machine, PyTorch's thread pool
    # waiting for busy cores made the training several times slower
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", "mimcore", *args], stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"render_screenshot: `mim {args[0]}` failed with exit code {proc.returncode}")
    return proc.stdout


def train_and_segment(work: Path, steps: int, labels: str, model: str | None) -> tuple[Path, Path, str]:
    """Returns (CT file, .seg.nrrd file, caption text)."""
    trained_here = model is None
    datalist = Path(mim("data", "samples", "--quiet").strip().splitlines()[-1])
    data = json.loads(datalist.read_text(encoding="utf-8"))
    base = datalist.parent
    # example_ct.nii.gz (112 slices); the labelled example_ct_sm.nii.gz is 30 of its slices
    target = base / data["pretraining"][0]["image"]
    if model is None:
        ft_list = work / "finetune_datalist.json"
        ft_list.write_text(json.dumps({"labels": data["labels"], "validation": [], "training": [
            {"image": str(base / e["image"]), "label": str(base / e["label"])} for e in data["training"]]}, indent=1))
        run = work / "finetune"
        # Coarse spacing: a tiny model finds the big organs after a few dozen CPU steps.
        mim("finetune", "--datalist", str(ft_list), "--labels", labels, "--preset", "tiny",
            "--spacing", "6", "6", "4", "--lr", "3e-3", "--steps", str(steps), "--val-every", str(steps),
            "--output", str(run), "--device", "cpu", "--progress", "none", "--no-tensorboard",
            "--resume")  # a reused --workdir continues (or keeps) its run instead of being refused
        model = str(run / "model")
    seg = work / "segmentation.nii.gz"
    mim("segment", str(target), "--model", model, "--output", str(seg), "--seg-nrrd", "--device", "cpu",
        "--progress", "none")
    seg_nrrd = next(work.glob("*.seg.nrrd"))
    return target, seg_nrrd, _caption(Path(model), target, trained_here)


def _caption(model: Path, target: Path, trained_here: bool) -> str:
    """What produced the picture, from the model bundle's own description."""
    desc = json.loads((model / "model.json").read_text(encoding="utf-8")) if (model / "model.json").is_file() else {}
    arch, train = desc.get("architecture", {}), desc.get("training", {})
    spacing = desc.get("preprocessing", {}).get("spacing")
    network = {"mim-seg": "MiM network", "unetr": "UNETR", "swinunetr": "SwinUNETR"}.get(arch.get("kind"), "network")
    text = f"mim segment {target.name} with a '{arch.get('preset', '?')}' {network}"
    if train.get("step") is not None:
        init = "from scratch" if not train.get("init") else "from a pre-trained encoder"
        cases = train.get("train_cases", "?")
        text += f" fine-tuned {train['step']} steps {init} on {cases} labelled case{'' if cases == 1 else 's'}"
        if trained_here:  # both labelled samples; example_ct_sm is part of the segmented CT
            text += " (the sample CTs; one is 30 slices of this CT)"
    if spacing:
        text += f", at {'x'.join(f'{s:g}' for s in spacing)} mm"
    if trained_here:
        text += ", on a CPU"
    return text + ". A quick demonstration model, not a validated one."


def render(ct_file: Path, seg_file: Path, caption: str, output: Path) -> None:
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter
    from vtkmodules.util.numpy_support import vtk_to_numpy

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    layout = [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.threed_view(),
              ViewLayoutDefinition.coronal_view(), ViewLayoutDefinition.sagittal_view()]
    views = [app.view_manager.create_view(v) for v in layout]
    app.view_manager.set_current_view_ids([v.singleton_tag for v in layout])
    for view in views:
        view.render_window().SetSize(VIEW_SIZE, VIEW_SIZE)

    volume = app.io_manager.load_volumes(str(ct_file))[0]
    display = volume.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(400, 40)  # abdomen window
    segmentation = app.io_manager.load_segmentation(str(seg_file))
    segmentation.CreateClosedSurfaceRepresentation()
    seg_display = segmentation.GetDisplayNode()
    seg_display.SetOpacity2DFill(0.45)
    seg_display.SetOpacity3D(1.0)

    app.display_manager.show_volume_in_slice_background(volume)
    # slice through the middle of the segmented organs
    centre, extent = _segment_centre(segmentation, volume)
    for view in app.view_manager.get_slice_views():
        view.fit_view_to_content()
        view.get_view_node().JumpSliceByCentering(*centre)
    for view in app.view_manager.get_threed_views():
        view.get_view_node().SetBoxVisible(False)
        camera = view.renderer().GetActiveCamera()
        camera.SetFocalPoint(*centre)
        # from the front (anterior), as Slicer's default 3D view; patient right on screen left
        camera.SetPosition(centre[0], centre[1] + 2.3 * extent, centre[2])
        camera.SetViewUp(0, 0, 1)
        camera.SetViewAngle(30)
        view.renderer().ResetCameraClippingRange()

    tiles = []
    for view in views:
        view.render()
        grab = vtkWindowToImageFilter()
        grab.SetInput(view.render_window())
        grab.ReadFrontBufferOff()
        grab.Update()
        img = grab.GetOutput()
        w, h, _ = img.GetDimensions()
        arr = vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3]
        tiles.append(Image.fromarray(np.ascontiguousarray(arr)))
    _compose(tiles, segmentation, caption, output)


def _segment_centre(segmentation, volume) -> tuple[list[float], float]:
    """RAS centre and largest extent (mm) of the volume, so every view shows the whole body."""
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    centre = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
    return centre, max(bounds[1] - bounds[0], bounds[3] - bounds[2], bounds[5] - bounds[4])


def _compose(tiles, segmentation, caption: str, output: Path) -> None:
    gap = 4
    width = 2 * VIEW_SIZE + gap
    canvas = Image.new("RGB", (width, 2 * VIEW_SIZE + gap + CAPTION_HEIGHT), (30, 30, 30))
    borders = [(243, 74, 51), (120, 120, 200), (109, 173, 74), (239, 214, 77)]  # Red, 3D, Green, Yellow
    for i, (tile, colour) in enumerate(zip(tiles, borders)):
        x, y = (i % 2) * (VIEW_SIZE + gap), (i // 2) * (VIEW_SIZE + gap)
        canvas.paste(tile.resize((VIEW_SIZE, VIEW_SIZE)), (x, y))
        ImageDraw.Draw(canvas).rectangle([x, y, x + VIEW_SIZE - 1, y + 5], fill=colour)
    draw = ImageDraw.Draw(canvas)
    font = _font(17)
    small = _font(14)
    y0 = 2 * VIEW_SIZE + gap + 8
    draw.text((10, y0), "MiM Segmentation (3D Slicer extension MiMSlicer)", fill=(235, 235, 235), font=font)
    line, y = "", y0 + 28
    for word in caption.split():
        if draw.textlength(f"{line} {word}", font=small) > width - 20:
            draw.text((10, y), line, fill=(190, 190, 190), font=small)
            line, y = word, y + 20
        else:
            line = f"{line} {word}".strip()
    draw.text((10, y), line, fill=(190, 190, 190), font=small)
    # legend: segment names and colours as written by mim segment --seg-nrrd
    seg = segmentation.GetSegmentation()
    x = width - 10
    for i in reversed(range(seg.GetNumberOfSegments())):
        segment = seg.GetNthSegment(i)
        name = segment.GetName()
        colour = tuple(int(255 * c) for c in segment.GetColor())
        tw = draw.textlength(name, font=small)
        x -= tw
        draw.text((x, y0 + 4), name, fill=(235, 235, 235), font=small)
        x -= 20
        draw.rectangle([x, y0 + 6, x + 14, y0 + 20], fill=colour)
        x -= 14
    output.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(output, optimize=True)
    print(output)


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    ap.add_argument("--steps", type=int, default=600, help="fine-tuning steps of the tiny model")
    ap.add_argument("--labels", default="liver,spleen", help="TotalSegmentator label names to learn")
    ap.add_argument("--model", help="segment with this model bundle instead of training one")
    ap.add_argument("--workdir", type=Path, help="keep the intermediate files here (default: a temporary folder)")
    args = ap.parse_args()
    if importlib.util.find_spec("trame_slicer") is None:  # checked first: training the model takes minutes
        raise SystemExit("render_screenshot.py draws with trame-slicer's offscreen Slicer views; install them "
                         "first: pip install \"trame-slicer[standalone]==2.0.0\"")
    with tempfile.TemporaryDirectory(prefix="mim-screenshot-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ct, seg, caption = train_and_segment(work, args.steps, args.labels, args.model)
        render(ct, seg, caption, args.output)


if __name__ == "__main__":
    main()
