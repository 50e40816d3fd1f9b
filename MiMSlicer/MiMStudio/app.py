"""MiM Studio's server: one Slicer scene (trame-slicer), the MiMSlicerLib logic on it, and
the page's actions. Thin by design: every computation is MiMSlicerLib's (the same calls
the Qt module makes) or a ``mimcore`` job in a child process; this file moves values
between the page's state and those calls.

Tasks are polled every :data:`POLL_S` seconds on the server's event loop, which is also
the thread that renders the views and owns the scene, as the Qt module polls from its
timer on Slicer's main thread.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import numpy as np
import slicer
import vtk
from trame.app import get_server
from vtk.util.numpy_support import vtk_to_numpy
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.segmentation import SegmentationEffectPaint

from MiMSlicerLib.dependencies import DeviceCheckRun
from MiMSlicerLib.errors import MiMSlicerError
from MiMSlicerLib.fields import default_fast, gpu_found, gpu_requested, runtime_text
from MiMSlicerLib.exports import write_label_nifti, write_seg_nrrd
from MiMSlicerLib.logic import MiMLogicCore
from MiMSlicerLib.progress import curves, progress_fraction, progress_text
from MiMSlicerLib.segmentations import segments
from MiMSlicerLib.volumes import load_volume
from MiMStudio import views
from MiMStudio.access import AccessGuard, page_guard
from MiMStudio.cases import CaseList, cases_text
from MiMStudio.catalog import Catalog, sample_datalist
from MiMStudio.config import StudioConfig
from MiMStudio.uploads import UploadFolder, too_large_message

POLL_S = 0.25
KINDS = ("segment", "preview", "finetune")
CURVE_W, CURVE_H = 300, 120


def polyline(points: list[tuple[int, float]], last_step: int, low: float, high: float) -> str:
    """SVG ``points`` of a curve in a CURVE_W x CURVE_H box (step on x, value on y)."""
    span = (high - low) or 1.0
    return " ".join(f"{CURVE_W * s / max(1, last_step):.1f},{CURVE_H - CURVE_H * (v - low) / span:.1f}"
                    for s, v in points)


CURVE_COLORS = {"loss": "#ff9800", "dice": "#4caf50"}


def curves_svg(points: dict[str, str]) -> str:
    """An SVG of the curves (``{"loss": polyline points, "dice": ...}``); numbers only come in."""
    lines = "".join(f'<polyline class="curve-{name}" points="{pts}" fill="none" stroke="{CURVE_COLORS[name]}" '
                    'stroke-width="2"/>' for name, pts in points.items() if name in CURVE_COLORS)
    return (f'<svg width="{CURVE_W}" height="{CURVE_H}" style="background:#222;border-radius:4px">'
            f"{lines}</svg>")


def segment_volume_ml(segmentation_node, segment_id: str) -> float:
    """Volume of a segment in ml: the voxels of its binary labelmap (as Slicer's segmentations
    logic extracts it) holding its label value (segments may share one labelmap)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    image = slicer.vtkOrientedImageData()
    if segment is None or not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, image) or image.GetPointData().GetScalars() is None:
        return 0.0
    count = int(np.count_nonzero(vtk_to_numpy(image.GetPointData().GetScalars()) == segment.GetLabelValue()))
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    columns = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    return count * abs(float(np.linalg.det(columns))) / 1000.0


class StudioApp:
    """The server of one MiM Studio page (see :mod:`MiMStudio.access` for why one)."""

    def __init__(self, config: StudioConfig, server=None):
        self.config = config
        self.server = server or get_server(client_type="vue3")
        self.state, self.ctrl = self.server.state, self.server.controller
        self.slicer = SlicerApp()
        self.scene = self.slicer.scene
        register_rca_factories(self.slicer.view_manager, self.server)
        self.layout_manager = LayoutManager(self.scene, self.slicer.view_manager, self.server)
        views.register_layouts(self.layout_manager)
        self.layout_manager.set_layout("segment")

        env = {**config.env}
        self.logic = MiMLogicCore(scene=self.scene, models_dir=str(config.models_dir) if config.models_dir else None,
                                  env=env)
        self.uploads = UploadFolder(config.max_upload_bytes)
        sample_dir = sample_datalist(env=env).parent if config.samples else None
        self.catalog = Catalog(config.data_dirs, sample_dir, self.uploads.path)
        self.guard = AccessGuard(config.token)
        self.server.add_protocol_to_configure(lambda protocol: protocol.registerLinkProtocol(self.guard))
        self.ctrl.on_server_bind.add(lambda web_server: web_server.app.middlewares.append(page_guard(config.token, self.guard)))

        self.tasks: dict[str, object] = {}
        self.volume_node = None
        self.segmentation_node = None
        self.preview_result: dict | None = None
        self.preview_center: list[float] | None = None
        self._loaded: list = []  # nodes of the current volume (removed when another is loaded, unless a case)
        self.cases = CaseList()  # the fine-tuning cases (kept in the scene across loads)
        self._finetune_cases = 0
        self._device_check = None  # DeviceCheckRun of --device auto: decides the Fast (CPU) default
        self._segment_fast_run = False  # the running segment job has --fast
        self._set_defaults()
        self._bind()
        self._click_observer = None
        self.ctrl.on_server_ready.add(self._on_ready)
        self.slicer.segmentation_editor.segmentation_modified.connect(self._on_painted)

    # ------------------------------------------------------------------ state

    def _set_defaults(self) -> None:
        s = self.state
        s.trame__title = "MiM Studio"
        s.update({
            "alert_text": "", "alert_type": "info", "upload_limit": self.config.max_upload_bytes,
            "volumes": self.catalog.volumes(), "volume_choice": None, "volume_name": "",
            "models": [], "model_choice": None, "segment_fast": default_fast(gpu_requested(self.config.device)),
            "checkpoints": self.catalog.checkpoints(), "checkpoint_choice": None,
            "segments": [], "has_segmentation": False, "download_base": "segmentation", "layout": "segment",
            "preview_levels": [], "preview_level": None, "preview_center_text": "volume centre",
            "preview_volumes": [], "preview_volume": None,
            "pick_center": False, "painting": False, "paint_segment": None,
            "ft_steps": 2, "ft_name": "", "ft_spacing": "", "ft_curves": {}, "ft_last": "",
            "ft_cases": [], "ft_cases_text": cases_text(0),
        })
        for kind in KINDS:
            s[f"{kind}_running"] = False
            s[f"{kind}_progress"] = 0
            s[f"{kind}_status"] = ""
        self._refresh_models()
        if self.state.volumes:
            s.volume_choice = self.state.volumes[0]["value"]
        if self.state.checkpoints:
            s.checkpoint_choice = self.state.checkpoints[0]["value"]

    def _refresh_models(self, select: str | None = None) -> None:
        models = [m for m in self.logic.models() if not m.get("error")]
        self.state.models = [{"title": f"{m['name']} ({', '.join(m['labels'])})", "value": m["name"]}
                             for m in models]
        names = [m["name"] for m in models]
        if select in names:
            self.state.model_choice = select
        elif self.state.model_choice not in names:
            self.state.model_choice = names[0] if names else None

    def _bind(self) -> None:
        for name in ("load_volume", "segment", "preview", "finetune", "cancel", "upload", "upload_too_large",
                     "download_seg_nrrd", "download_nifti", "snapshot", "start_paint", "stop_paint", "refresh",
                     "add_case", "remove_case"):
            self.server.trigger(name)(self._guarded(getattr(self, name)))
        self.state.change("preview_level")(lambda preview_level, **_: self._show_preview_level(preview_level))
        self.state.change("preview_volume")(
            lambda preview_volume, **_: self._show_preview_volume(self.state.preview_level, preview_volume))
        self.state.change("layout")(lambda layout, **_: self.layout_manager.set_layout(layout))

    def _guarded(self, action):
        """Run a page action; a refusal or failure becomes the page's message, not a traceback."""
        is_async = asyncio.iscoroutinefunction(action)

        async def run_async(*args):
            try:
                return await action(*args)
            except Exception as e:  # noqa: BLE001 (shown to the user)
                self._report(e)
                return None

        def run(*args):
            try:
                return action(*args)
            except Exception as e:  # noqa: BLE001 (shown to the user)
                self._report(e)
                return None

        return run_async if is_async else run

    def _report(self, error: Exception) -> None:
        text = str(error) if isinstance(error, MiMSlicerError) else f"{type(error).__name__}: {error}"
        self.say(text, "error")

    def say(self, text: str, kind: str = "info") -> None:
        self.state.alert_text, self.state.alert_type = text, kind

    # ------------------------------------------------------------------ data

    def refresh(self) -> None:
        self.state.volumes = self.catalog.volumes()
        self.state.checkpoints = self.catalog.checkpoints()
        self._refresh_models()

    def load_volume(self, value: str | None = None) -> None:
        path = self.catalog.resolve(value or self.state.volume_choice, "volume")
        for kind in KINDS:
            if self.state[f"{kind}_running"]:
                raise MiMSlicerError(f"A {kind} job is running on the current volume: wait for it or cancel it.")
        self.stop_paint()
        for node in self._loaded:
            if node.GetScene() is not self.scene:
                continue
            if self.cases.holds(node):  # a fine-tuning case stays in the scene, out of sight
                if node.IsA("vtkMRMLSegmentationNode") and node.GetDisplayNode() is not None:
                    node.GetDisplayNode().SetVisibility(False)
            else:
                self.scene.RemoveNode(node)
        self._loaded, self.segmentation_node, self.preview_result = [], None, None
        node = load_volume(path, self.scene)
        stem = path.name.split(".")[0]
        if self.scene.GetFirstNodeByName(stem) in (None, node):  # its file's name again, not "ct_1"
            node.SetName(stem)
        self.volume_node = node
        self._loaded.append(node)
        self.slicer.display_manager.show_volume_in_slice_background(node, 0)
        self.slicer.display_manager.reset_views(0)
        for kind in KINDS:  # the last task's outcome belonged to the previous volume
            self.state[f"{kind}_status"], self.state[f"{kind}_progress"] = "", 0
        self.state.update({"volume_name": node.GetName(), "segments": [], "has_segmentation": False,
                           "download_base": node.GetName(), "preview_levels": [], "preview_level": None,
                           "preview_volumes": [], "preview_volume": None,
                           "layout": "segment", "preview_center_text": "volume centre"})
        self.preview_center = None
        self.say(f"Loaded {node.GetName()} ({' x '.join(str(d) for d in node.GetImageData().GetDimensions())} "
                 "voxels).", "success")

    def upload(self, files) -> None:
        files = files or []
        if len(files) != 1:
            raise MiMSlicerError("Upload one volume file at a time.")
        path = self.uploads.save(files[0])
        self.state.volumes = self.catalog.volumes()
        self.state.volume_choice = f"upload:{path.name}"
        self.load_volume(self.state.volume_choice)

    def upload_too_large(self, name, size) -> None:
        """The page refused a file before sending it: the server words the message."""
        raise MiMSlicerError(too_large_message(str(name), int(size), self.config.max_upload_bytes))

    def _need_volume(self):
        if self.volume_node is None or self.volume_node.GetScene() is not self.scene:
            raise MiMSlicerError("Load a volume first (a sample, a data-folder file or an upload).")
        return self.volume_node

    # ------------------------------------------------------------------ tasks

    def _start(self, kind: str, task) -> None:
        self.tasks[kind] = task
        self.state[f"{kind}_running"] = True
        self.state[f"{kind}_progress"] = 0
        self.state[f"{kind}_status"] = progress_text(task)

    def _check_idle(self, kind: str) -> None:
        if kind in self.tasks:
            raise MiMSlicerError(f"A {kind} job is already running: wait for it or cancel it.")

    def segment(self, model: str | None = None) -> None:
        self._check_idle("segment")
        volume = self._need_volume()
        if model is not None:
            self.state.model_choice = model
        if not self.state.model_choice:
            raise MiMSlicerError("Choose a model (the library is empty: fine-tune one, or add one with "
                                 "`mim models add`).")
        self.stop_paint()
        self._segment_fast_run = bool(self.state.segment_fast)
        self._start("segment", self.logic.start_segment(volume, self.state.model_choice, device=self.config.device,
                                                         segmentation_node=self.segmentation_node,
                                                         fast=self._segment_fast_run))

    def preview(self, checkpoint: str | None = None) -> None:
        self._check_idle("preview")
        volume = self._need_volume()
        if checkpoint is not None:
            self.state.checkpoint_choice = checkpoint
        if not self.state.checkpoint_choice:
            raise MiMSlicerError("Choose a pre-training run (none in the data folders: run `mim pretrain` there).")
        checkpoint = self.catalog.resolve(self.state.checkpoint_choice, "checkpoint")
        self._start("preview", self.logic.start_preview(str(checkpoint), volume, center_ras=self.preview_center,
                                                         device=self.config.device))

    # ------------------------------------------------------------------ fine-tuning cases

    def add_case(self) -> None:
        """Add the current volume and its segmentation to the fine-tuning cases (the Qt module's
        "Add case"): they stay in the scene when another volume is loaded."""
        volume = self._need_volume()
        if self.segmentation_node is None:
            raise MiMSlicerError("Nothing to add: segment the volume (or paint) first, then add it as a case.")
        self.stop_paint()
        number = self.cases.add(volume, self.segmentation_node)
        self._show_cases()
        self.say(f"Case {number}: {volume.GetName()} with '{self.segmentation_node.GetName()}'.", "success")

    def remove_case(self, index) -> None:
        """Take a case off the list; its nodes leave the scene unless they are the current volume's."""
        for node in self.cases.remove(index):
            current = any(node is loaded for loaded in self._loaded)
            if not current and not self.cases.holds(node) and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)
        self._show_cases()

    def _show_cases(self) -> None:
        self.state.ft_cases = self.cases.rows()
        self.state.ft_cases_text = cases_text(len(self.cases))

    def finetune(self, steps=None, name=None, spacing=None, model=None) -> None:
        """Fine-tune ``model`` (default the selected one) on the listed cases, or, with none listed,
        on the current volume and segmentation. The page passes its field values along, so the
        action sees what was typed just before."""
        self._check_idle("finetune")
        for key, value in (("ft_steps", steps), ("ft_name", name), ("ft_spacing", spacing), ("model_choice", model)):
            if value is not None:
                self.state[key] = value
        if len(self.cases):
            pairs = list(self.cases.pairs)
        else:
            volume = self._need_volume()
            if self.segmentation_node is None:
                raise MiMSlicerError("Nothing to learn from: segment the volume (or paint) first, then correct it.")
            pairs = [(volume, self.segmentation_node)]
        try:
            steps = int(self.state.ft_steps)
        except (TypeError, ValueError):
            raise MiMSlicerError(f"Steps must be a whole number, got {self.state.ft_steps!r}.") from None
        spacing = None
        if str(self.state.ft_spacing or "").strip():
            try:
                spacing = [float(v) for v in str(self.state.ft_spacing).replace(",", " ").split()]
            except ValueError:
                spacing = []
            if len(spacing) == 1:
                spacing *= 3
            if len(spacing) != 3 or min(spacing) <= 0:
                raise MiMSlicerError("Spacing: one or three positive numbers in mm, e.g. '1.5' or '1.5 1.5 2'.")
        self.stop_paint()
        task = self.logic.start_finetune(pairs, self.state.model_choice or None, steps,
                                         device=self.config.device, name=(self.state.ft_name or "").strip() or None,
                                         spacing=spacing)
        self.state.ft_curves, self.state.ft_last = {}, ""
        self._finetune_cases = len(pairs)
        self._start("finetune", task)

    def cancel(self, kind: str) -> None:
        task = self.tasks.pop(kind, None)
        if task is not None:
            task.cancel()
        self.state[f"{kind}_running"] = False
        self.state[f"{kind}_status"] = "Cancelled." if task is not None else ""
        self.state[f"{kind}_progress"] = 0

    def _poll_device_check(self) -> None:
        """Once the device check of ``--device auto`` is done: Fast (CPU) ticked unless it found a GPU."""
        if self._device_check is None or self._device_check.poll():
            return
        check, self._device_check = self._device_check.result, None
        with self.state:
            self.state.segment_fast = default_fast(gpu_found(check))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            self._poll_device_check()
            if not self.tasks:
                continue
            with self.state:
                for kind, task in list(self.tasks.items()):
                    try:
                        running = task.poll()
                    except Exception as e:  # noqa: BLE001
                        task.cancel()
                        running = False
                        task.error = task.error or str(e)
                    self.state[f"{kind}_progress"] = round(100 * progress_fraction(task))
                    self.state[f"{kind}_status"] = progress_text(task)
                    if kind == "finetune":
                        self._show_curves(task)
                    if not running:
                        self.tasks.pop(kind, None)
                        self.state[f"{kind}_running"] = False
                        if task.error:
                            self.state[f"{kind}_status"] = task.error
                            self.say(f"{kind.capitalize()} failed: {task.error}", "error")
                        else:
                            self._guarded(getattr(self, f"_{kind}_done"))(task)

    def _segment_done(self, task) -> None:
        node = task.result
        self.segmentation_node = node
        self._loaded.append(node)
        self.slicer.display_manager.set_node_visible_in_group(node, 0)
        node.CreateClosedSurfaceRepresentation()  # the 3D surface
        display = node.GetDisplayNode()
        display.SetVisibility(True)
        display.SetVisibility3D(True)
        for view in self.slicer.view_manager.get_threed_views(0):
            view.reset_view()
        for view in self.slicer.view_manager.get_views(0):
            view.schedule_render()  # stream the overlay and the surface to the page now
        self._show_segments()
        self.state.has_segmentation = True
        fast = " (fast" + runtime_text(task.events) + ")" if self._segment_fast_run else ""
        self.say(f"Segmented {self.volume_node.GetName()}: {len(self.state.segments)} segments{fast}.", "success")

    def _show_segments(self) -> None:
        """The segment list of the page: name, colour, size in ml."""
        seg = self.segmentation_node.GetSegmentation()
        items = []
        for segment_id, name in segments(self.segmentation_node):
            segment = seg.GetSegment(segment_id)
            r, g, b = (int(round(255 * c)) for c in segment.GetColor())
            items.append({"id": segment_id, "name": name, "color": f"rgb({r}, {g}, {b})",
                          "ml": round(segment_volume_ml(self.segmentation_node, segment_id), 1)})
        self.state.segments = items
        if items and self.state.paint_segment not in [i["id"] for i in items]:
            self.state.paint_segment = items[0]["id"]

    def _preview_done(self, task) -> None:
        self.preview_result = task.result
        for level in task.result.values():
            for item in level["volumes"]:
                self._loaded += [item[k] for k in ("input", "reconstruction", "original") if item.get(k)]
        levels = sorted(task.result)
        self.state.preview_levels = [{"title": f"Level {n} (loss {task.result[n].get('loss') or 0:.3g})", "value": n}
                                     for n in levels]
        self.state.layout = "preview"
        self.state.preview_level = levels[0]
        self._show_preview_level(levels[0])
        self.say(f"Preview: {len(levels)} levels reconstructed.", "success")

    def _show_preview_level(self, level) -> None:
        """Show ``level``: its volume nearest the chosen centre, and the level's volumes to choose from
        (level 1: 1, level 2: 4, level 3: 16)."""
        if not self.preview_result or level not in self.preview_result:
            return
        entry = self.preview_result[level]
        nearest = next(v["index"] for v in entry["volumes"] if v["input"] is entry["input"])
        self.state.preview_volumes = [
            {"title": f"L{level}.{v['index']:02d}" + (f" (loss {v['loss']:.3g})" if v.get("loss") is not None else "")
             + (" - nearest the centre" if v["index"] == nearest else ""), "value": v["index"]}
            for v in entry["volumes"]]
        self.state.preview_volume = nearest
        self._show_preview_volume(level, nearest)

    def _show_preview_volume(self, level, index) -> None:
        """Hidden input, reconstruction and original of volume ``index`` of ``level``, in the three views."""
        if not self.preview_result or level not in self.preview_result:
            return
        item = next((v for v in self.preview_result[level]["volumes"] if v["index"] == index), None)
        if item is None:
            return
        self.layout_manager.set_layout("preview")
        for role, tag, _color in views.PREVIEW_ROLES:
            view = self.slicer.view_manager.get_view(tag)
            if view is not None and item.get(role) is not None:
                view.set_background_volume_id(item[role].GetID())
                view.set_foreground_volume_id(None)
                view.fit_view_to_content()
                view.schedule_render()

    def _finetune_done(self, task) -> None:
        self._refresh_models(select=task.result)
        self.state.ft_last = task.result
        cases = f"{self._finetune_cases} case{'s' if self._finetune_cases != 1 else ''}"
        self.say(f"Fine-tuned model '{task.result}' ({cases}) is in the library and selected for Segment.",
                 "success")

    def _show_curves(self, task) -> None:
        found = curves(task)
        if not found:
            return
        last = max(s for points in found.values() for s, _v in points)
        shown = {}
        for name, points in found.items():
            values = [v for _s, v in points]
            low, high = (0.0, 1.0) if name == "dice" else (min(0.0, min(values)), max(values))
            shown[name] = {"points": polyline(points, last, low, high), "last": f"{values[-1]:.4g}"}
        shown["svg"] = curves_svg({n: c["points"] for n, c in shown.items()})
        self.state.ft_curves = shown

    # ------------------------------------------------------------------ segment editor

    def start_paint(self) -> None:
        volume = self._need_volume()
        editor = self.slicer.segmentation_editor
        if self.state.layout != "segment":  # the brush paints on the CT's views, not on the preview's
            self.state.layout = "segment"
            self.layout_manager.set_layout("segment")
        if self.segmentation_node is None:
            node = editor.create_empty_segmentation_node()
            node.SetName(f"{volume.GetName()} - annotation")
            self.segmentation_node = node
            self._loaded.append(node)
            editor.set_active_segmentation(node, volume)
            # one (empty) segment per label of the selected model, so that it can be fine-tuned on the drawing
            labels = (self.logic.model(self.state.model_choice)["label_table"] if self.state.model_choice
                      else [{"name": "segment_1"}])
            for entry in labels:
                color = [c / 255.0 for c in entry["color"]] if entry.get("color") else None
                editor.add_empty_segment(segment_name=str(entry["name"]), segment_color=color)
        else:
            # a model's result shares one labelmap among its segments; the brush edits one
            # segment's labelmap, so each gets its own first (or a stroke would replace them all)
            segmentation = self.segmentation_node.GetSegmentation()
            for segment_id, _name in segments(self.segmentation_node):
                segmentation.SeparateSegmentLabelmap(segment_id)
            editor.set_active_segmentation(self.segmentation_node, volume)
        self._show_segments()
        if self.state.paint_segment:
            editor.set_active_segment_id(self.state.paint_segment)
        editor.set_active_effect_type(SegmentationEffectPaint)
        self.state.painting = True
        self.state.has_segmentation = True

    def _on_painted(self, *_args) -> None:
        if self.segmentation_node is not None:
            with self.state:
                self._show_segments()

    def stop_paint(self) -> None:
        if self.state.painting:
            self.slicer.segmentation_editor.deactivate_effect()
            if self.segmentation_node is not None:
                self.segmentation_node.CreateClosedSurfaceRepresentation()  # the 3D surface, after the edits
                self._show_segments()
                asyncio.get_event_loop().call_later(1.0, self._on_painted)  # a stroke still being applied
        self.state.painting = False

    # ------------------------------------------------------------------ downloads

    async def download_seg_nrrd(self):
        return self._attachment(lambda folder: write_seg_nrrd(self._need_segmentation(), self.volume_node,
                                                              folder / "out.seg.nrrd"))

    async def download_nifti(self):
        return self._attachment(lambda folder: write_label_nifti(self._need_segmentation(), self.volume_node,
                                                                 folder / "out.nii.gz"))

    async def snapshot(self, view_name: str = "Red"):
        view = self.slicer.view_manager.get_view(str(view_name))
        if view is None:
            raise MiMSlicerError(f"No view named {view_name!r}.")
        return self.server.protocol.addAttachment(views.snapshot_png(view))

    def _need_segmentation(self):
        if self.segmentation_node is None or self.segmentation_node.GetScene() is not self.scene:
            raise MiMSlicerError("No segmentation to download: segment the volume first.")
        return self.segmentation_node

    def _attachment(self, write):
        with tempfile.TemporaryDirectory(prefix="mimstudio-download-") as folder:
            path = write(Path(folder))
            return self.server.protocol.addAttachment(path.read_bytes())

    # ------------------------------------------------------------------ preview centre

    def _on_ready(self, **_kwargs) -> None:
        if gpu_requested(self.config.device) is None:  # auto: is there a GPU? (a child process, seconds)
            self._device_check = DeviceCheckRun("auto").start()
        asyncio.get_event_loop().create_task(self._poll_forever())
        view = self.slicer.view_manager.get_view("Red")
        if view is not None:
            self._click_observer = view.interactor().AddObserver("LeftButtonPressEvent", self._on_axial_click, 1.0)

    def _on_axial_click(self, interactor, _event) -> None:
        if not self.state.pick_center:
            return
        x, y = interactor.GetEventPosition()
        ras = views.ras_at_display_point(self.scene, "Red", x, y)
        if ras is None:
            return
        with self.state:
            self.preview_center = ras
            self.state.preview_center_text = "R {:.1f}, A {:.1f}, S {:.1f} mm".format(*ras)
            self.state.pick_center = False

    def stop(self) -> None:
        for kind in list(self.tasks):
            self.cancel(kind)
        if self._device_check is not None:
            self._device_check.cancel()
        self.uploads.remove()
