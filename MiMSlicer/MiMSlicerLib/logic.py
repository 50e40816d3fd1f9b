"""MiMLogicCore: what the MiMSlicer GUI calls (model library, Segment, Preview, Fine-tune).

Every long operation returns a :class:`MiMSlicerLib.tasks.Task` at once: its inputs are
written to files here (volume nodes with their world geometry, segmentations as label
maps on their volume's grid), ``python -m mimcore ...`` runs in a child process, and
``task.poll()`` - called from the GUI's timer - reports progress and, at the end,
builds the result in the scene. Nothing here imports torch or Qt.

Example (Slicer's Python console)::

    logic = MiMLogicCore()
    task = logic.start_segment(getNode("CTChest"), logic.models()[0])
    while task.poll(): slicer.app.processEvents()
    segmentation = task.result
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import slicer

from MiMSlicerLib import library
from MiMSlicerLib.errors import MiMSlicerError
from MiMSlicerLib.jobs import default_python
from MiMSlicerLib.preview import load_reconstruction
from MiMSlicerLib.segmentations import export_labelmap, import_labelmap, normalize_name, segments
from MiMSlicerLib.tasks import Finished, Step, Task
from MiMSlicerLib.volumes import check_scalar_volume, parent_to_world, write_volume

DEFAULT_SCRATCH_PRESET = "tiny"  # fine-tuning from scratch (no init): a few local cases cannot train more


class AddModelTask(Task):
    """The task of :meth:`MiMLogicCore.start_add_model`: shows the events of ``mim models add
    --progress json`` (the download's progress in bytes) as
    :func:`MiMSlicerLib.library.add_model_event` makes them (KiB, a readable stage)."""

    def __init__(self, source: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.source = source

    def _on_event(self, event: dict) -> None:
        super()._on_event(library.add_model_event(event, self.source))


class MiMLogicCore:
    """The module's logic, usable without the GUI.

    scene:      the MRML scene results go to (default ``slicer.mrmlScene``).
    python:     the interpreter of the child jobs (default ``sys.executable``: PythonSlicer in Slicer).
    models_dir: the model library folder (default ``$MIM_MODELS_DIR``, else mimcore's per-user folder).
    registry:   model registry file or URL for "add from registry" (default ``$MIM_MODEL_REGISTRY``).
    env:        extra environment variables for the child jobs (e.g. ``{"CUDA_VISIBLE_DEVICES": "1"}``).
    """

    def __init__(self, scene=None, python: str | None = None, models_dir: str | None = None,
                 registry: str | None = None, env: dict[str, str] | None = None):
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
        if self.scene is None:
            raise MiMSlicerError("No MRML scene: pass scene=... (outside Slicer there is no slicer.mrmlScene).")
        self.python = python or default_python()
        self._models_dir = Path(models_dir).expanduser() if models_dir else None
        self.registry = registry or os.environ.get(library.ENV_REGISTRY) or None
        self.env = dict(env or {})

    # ------------------------------------------------------------------ model library

    @property
    def models_dir(self) -> Path:
        """The model library folder (resolved on first use)."""
        if self._models_dir is None:
            self._models_dir = library.default_library_dir()
        return self._models_dir

    def child_env(self) -> dict[str, str]:
        """Environment variables set for every child job (the library folder, plus ``env``)."""
        return {library.ENV_LIBRARY: str(self.models_dir), **self.env}

    def models(self) -> list[dict]:
        """The models in the library: ``{"name", "labels" (names), "label_table", "path", "preset",
        "error", ...}`` (see :mod:`MiMSlicerLib.library`), sorted by name."""
        return library.list_models(self.models_dir)

    def model(self, model) -> dict:
        """The entry of a library name, bundle path or entry dict (MiMSlicerError if unknown)."""
        return library.find_model(model, self.models_dir)

    def registry_models(self, registry: str | None = None) -> list[str]:
        """Names of the models a registry offers (default: the logic's registry)."""
        registry = registry or self.registry
        if not registry:
            raise MiMSlicerError(f"No model registry is configured: set {library.ENV_REGISTRY} to a registry file or "
                                 "URL, or add a model from a file.")
        return [str(m["name"]) for m in library.registry_entries(registry)]

    def add_model(self, source: str, name: str | None = None, overwrite: bool = False,
                  registry: str | None = None) -> str:
        """Add a bundle folder / model.json / .zip, or a registry model (``NAME`` looked up in the
        logic's registry, or ``REGISTRY_URL#NAME``), to the library; returns its library name.
        Runs ``mim models add`` in a child process and waits for it (downloads included)."""
        return library.add_model(source, self.models_dir, name=name, registry=registry or self.registry,
                                 overwrite=overwrite, python=self.python, env=self.child_env())

    def start_add_model(self, source: str, name: str | None = None, overwrite: bool = False,
                        registry: str | None = None, on_event: Callable[[dict], None] | None = None) -> Task:
        """:meth:`add_model` as a :class:`Task` that never blocks: ``mim models add`` in a child
        process, polled like the other tasks; ``task.result`` is the library name.

        A registry model's download reports progress: the child's own ``progress`` events
        (``mim models add --progress json``: bytes done/total, ETA), shown with stage
        ``downloading <name> (x.y of z.w MB)`` and step/total in KiB (see
        :func:`MiMSlicerLib.library.add_model_event`; the bytes stay in the event). Cancel
        kills the child and removes the staging folder it had made in the library: no
        partial entry is left (a partly downloaded file stays in the library's cache, and
        the next add of the same model resumes it).
        """
        source, registry = library.split_registry_source(str(source), registry or self.registry)
        argv = library.add_model_arguments(source, self.models_dir, name=name, registry=registry,
                                           overwrite=overwrite)
        task = AddModelTask(source, "add-model", self.scene, on_event=on_event, python=self.python,
                            env=self.child_env())
        staging_before = library.staging_dirs(self.models_dir)
        task.on_cancelled.append(lambda: library.remove_staging_dirs(self.models_dir, keep=staging_before))

        def finished(job):
            added = library.added_name(job, name)
            library.read_model(self.models_dir / added)  # it is there and readable
            return Finished(added)

        return task.start(Step(argv, finished, stage=f"adding {source} to the library"))

    # ------------------------------------------------------------------ tasks

    def _task(self, kind: str, on_event) -> Task:
        return Task(kind, self.scene, on_event=on_event, python=self.python, env=self.child_env())

    @staticmethod
    def _write_input(task: Task, volume_node, path: Path) -> Path:
        """Write the job's input volume into its folder; a refused volume cancels the task."""
        try:
            return write_volume(volume_node, path)
        except Exception:
            task.cancel()
            raise

    def _check_in_scene(self, node, what: str) -> None:
        if node.GetScene() is not self.scene:
            raise MiMSlicerError(f"{what} '{node.GetName()}' is no longer in the scene (it was removed while the "
                                 "job ran); nothing was added.")

    def start_segment(self, volume_node, model, device: str = "auto", segmentation_node=None,
                      on_event: Callable[[dict], None] | None = None, extra_args: Sequence[str] = (),
                      fast: bool = False) -> Task:
        """Segment ``volume_node`` with a library model (name, bundle path or entry dict).

        The result (``task.result``) is a segmentation node with one named, coloured segment
        per model label, on exactly the volume's voxel grid (and under its parent
        transform): ``segmentation_node``, whose segments are replaced, or a new node.
        extra_args: more ``mim segment`` options, e.g. ``["--tta"]``.
        fast: ``mim segment --fast`` (the quicker CPU settings; see :func:`segment_arguments`).
        """
        check_scalar_volume(volume_node, "the input volume")
        entry = self.model(model)
        if segmentation_node is not None and not segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise MiMSlicerError(f"'{segmentation_node.GetName()}' is not a segmentation node; choose a "
                                 "segmentation as output, or none to create one.")
        if segmentation_node is not None:
            parent_to_world(segmentation_node)  # refuse a non-linear transform now, not after the job
        task = self._task("segment", on_event)
        inputs = task.workdir / "input"
        output = task.workdir / "labels.nrrd"
        image = self._write_input(task, volume_node, inputs / "image.nrrd")

        def build(job):
            self._check_in_scene(volume_node, "The volume")
            if segmentation_node is not None:
                self._check_in_scene(segmentation_node, "The segmentation")
            node = import_labelmap(output, entry["label_table"], volume_node, self.scene, segmentation_node,
                                   name=f"{volume_node.GetName()} - {entry['name']}")
            return Finished(node)

        argv = segment_arguments(image, entry["path"], output, device=device, fast=fast, extra_args=extra_args)
        return task.start(Step(argv, build, stage=f"segmenting with {entry['name']}", temp_dirs=(inputs,)))

    def start_preview(self, checkpoint: str, volume_node, center_ras=None, device: str = "auto",
                      on_event: Callable[[dict], None] | None = None, seed: int = 0) -> Task:
        """Reconstruct the mask-in-mask levels of a crop of ``volume_node`` around ``center_ras``
        (world RAS mm; default the volume's centre) with a pre-training checkpoint.

        ``task.result``: ``{level: {"input", "reconstruction", "original": volume node,
        "volumes": [...all volumes of the level...], "loss", "folder"}}`` - see
        :func:`MiMSlicerLib.preview.load_reconstruction`; the nodes are placed at their true
        world positions, grouped in a subject-hierarchy folder per level.
        """
        check_scalar_volume(volume_node, "the volume to preview")
        if not checkpoint or not Path(str(checkpoint)).expanduser().exists():
            raise MiMSlicerError(f"No pre-training checkpoint at '{checkpoint}': choose a `mim pretrain` run folder "
                                 "or one of its checkpoint_NNNNNNNN.json files.")
        center = None
        if center_ras is not None:
            center = [float(c) for c in center_ras]
            if len(center) != 3:
                raise MiMSlicerError(f"The preview centre needs 3 coordinates (R, A, S in mm), got {center_ras!r}.")
        task = self._task("preview", on_event)
        inputs = task.workdir / "input"
        output = task.workdir / "reconstruction"
        image = self._write_input(task, volume_node, inputs / "image.nrrd")

        def build(job):
            self._check_in_scene(volume_node, "The volume")
            return Finished(load_reconstruction(output, self.scene, volume_node.GetName(), center_ras=center))

        argv = ["reconstruct", "--checkpoint", str(Path(str(checkpoint)).expanduser()), "--image", str(image),
                "--output", str(output), "--device", device, "--seed", str(int(seed)), "--progress", "json"]
        if center is not None:
            argv += ["--center", *(repr(c) for c in center)]
        return task.start(Step(argv, build, stage="reconstructing the levels", temp_dirs=(inputs,)))

    def start_finetune(self, cases, init: str | None, steps: int, device: str = "auto", name: str | None = None,
                       label_names: list[str] | None = None, on_event: Callable[[dict], None] | None = None,
                       preset: str | None = None, spacing: Sequence[float] | None = None,
                       extra_args: Sequence[str] = (), run_dir: str | None = None) -> Task:
        """Fine-tune a segmentation model on annotated cases; the new model joins the library.

        cases:       ``[(volume_node, segmentation_node), ...]`` from the scene, or a path: a
                     datalist JSON, or a folder with ``dataset.json``/``datalist.json``, or
                     with ``imagesTr/`` + ``labelsTr/`` (or ``images/`` + ``labels/``) of
                     same-named files.
        init:        where to start: a library model name or bundle path (keeps its head if
                     the labels agree), a ``mim pretrain`` run folder / checkpoint, an
                     authors' ``.pth``; None (or "") for random weights.
        label_names: the labels to learn, in value order (value = position + 1). Default:
                     for scene cases, the init model's labels if it is a bundle, else the
                     segment names of the cases (first seen first); for files, the
                     datalist's ``labels``. Segment names match them case-insensitively
                     (spaces, '_' and '-' alike); a case without one of them is refused
                     (add an empty segment if the structure is not in its image), extra
                     segments are left out (a ``note`` event says which).
        name:        library name of the new model (made path-safe; must be new). Default:
                     ``<first volume>-finetuned`` (numbered if taken).
        preset:      model size; default the init's, or ``"tiny"`` without init.
        spacing:     resampling spacing in mm (default mimcore's, 1.5 x 1.5 x 2).
        extra_args:  more ``mim finetune`` options (``["--val-every", "50", "--lr", "1e-4"]``).
        run_dir:     keep the run folder (checkpoints, curves, TensorBoard) there; default a
                     temporary folder, removed at the end.
        ``task.result`` is the new model's library name.
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise MiMSlicerError(f"The number of fine-tuning steps must be a positive integer, got {steps!r}.")
        init_path, init_entry = self._resolve_init(init)
        pairs = None if isinstance(cases, (str, os.PathLike)) else list(cases or [])
        if pairs is not None:
            if not pairs:
                raise MiMSlicerError("No annotated cases: add (volume, segmentation) pairs, or choose a folder.")
            for i, pair in enumerate(pairs, start=1):
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise MiMSlicerError(f"Case {i} must be a (volume, segmentation) pair, got {pair!r}.")
                check_scalar_volume(pair[0], f"the volume of case {i}")
                if pair[1] is None or not pair[1].IsA("vtkMRMLSegmentationNode"):
                    raise MiMSlicerError(f"Case {i} ('{pair[0].GetName()}') needs a segmentation node.")
            if label_names is None:
                label_names = init_entry["labels"] if init_entry else _segment_names(pairs)
            label_names = [str(n).strip() for n in label_names if str(n).strip()]
            if not label_names:
                raise MiMSlicerError("No labels to learn: the segmentations have no segments. Draw at least one.")
        lib_name = self._new_model_name(name, pairs)

        task = self._task("finetune", on_event)
        notes = []
        if name and lib_name != name:
            notes.append(f"the model is added to the library as '{lib_name}' (a library name has only letters, "
                         "digits, '.', '_', '+' and '-')")
        try:
            if pairs is not None:
                data_dir = task.workdir / "cases"
                data_args = ["--datalist", str(self._export_cases(pairs, label_names, data_dir, notes))]
                temp_dirs = (data_dir,)
            else:
                data_args = _file_case_args(Path(cases).expanduser(), label_names)
                temp_dirs = ()
        except Exception:
            task.cancel()
            raise
        run = Path(run_dir).expanduser() if run_dir else task.workdir / "run"
        argv = ["finetune", *data_args, "--output", str(run), "--steps", str(steps), "--device", device,
                "--progress", "json", "--name", lib_name]
        if init_path:
            argv += ["--init", init_path]
        if preset or not init_path:
            argv += ["--preset", preset or DEFAULT_SCRATCH_PRESET]
        if spacing is not None:
            argv += ["--spacing", *(repr(float(s)) for s in spacing)]
        if run_dir is None:
            argv.append("--no-tensorboard")  # the run folder is temporary
        argv += [str(a) for a in extra_args]

        def add_to_library(job):
            done = next((e for e in reversed(job.events) if e.get("event") == "done"), {})
            bundle = Path(done.get("model") or run / "model")
            if not (bundle / library.DESCRIPTION_FILE).is_file():
                raise MiMSlicerError(f"Fine-tuning ended without writing a model bundle in {bundle}.")
            return Step(["models", "add", str(bundle), "--library", str(self.models_dir), "--name", lib_name,
                         "--quiet"], finished, stage="adding the model to the library")

        def finished(job):
            library.read_model(self.models_dir / lib_name)  # it is there and readable
            return Finished(lib_name)

        for note in notes:
            task.note(note)
        return task.start(Step(argv, add_to_library, stage="fine-tuning", temp_dirs=temp_dirs))

    # ------------------------------------------------------------------ fine-tuning helpers

    def _resolve_init(self, init) -> tuple[str | None, dict | None]:
        """(the --init argument or None, the library entry if init is a segmentation bundle)."""
        if init is None or (isinstance(init, str) and not init.strip()):
            return None, None
        if isinstance(init, dict):
            init = init.get("path") or init.get("name")
        text = str(init).strip()
        if library.NAME_PATTERN.match(text) and (self.models_dir / text).is_dir():
            path = self.models_dir / text
        else:
            path = Path(text).expanduser()
            if not path.exists():
                raise MiMSlicerError(f"No model named '{text}' in the library and no such file or folder to start "
                                     "fine-tuning from: choose a library model, a `mim pretrain` run folder or a "
                                     "checkpoint file.")
        entry = None
        if (path / library.DESCRIPTION_FILE).is_file() or path.name == library.DESCRIPTION_FILE or (
                path.suffix == ".zip"):
            entry = library.read_model(path)
        return str(path), entry

    def _new_model_name(self, name: str | None, pairs) -> str:
        existing = {m["name"] for m in self.models()}
        if name:
            slug = library.slugify(name.strip())
            if slug in existing:
                raise MiMSlicerError(f"A model named '{slug}' is already in the library ({self.models_dir}); choose "
                                     "another name for the fine-tuned model, or remove the old one first.")
            return slug
        base = library.slugify(f"{pairs[0][0].GetName()}-finetuned" if pairs else "finetuned")
        candidate, n = base, 2
        while candidate in existing:
            candidate, n = f"{base}-{n}", n + 1
        return candidate

    def _export_cases(self, pairs, label_names: list[str], folder: Path, notes: list[str]) -> Path:
        """Write each (volume, segmentation) pair as image + label map files and a datalist.
        A label's colour is that of its segment in the first case (every case must have a
        segment for every label, see :func:`export_labelmap`)."""
        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for i, (volume, segmentation) in enumerate(pairs):
            image = write_volume(volume, folder / f"case{i:03d}_image.nrrd")
            try:
                match = export_labelmap(segmentation, volume, folder / f"case{i:03d}_label.nrrd", label_names)
            except MiMSlicerError as e:
                raise MiMSlicerError(f"Case {i + 1} ('{volume.GetName()}'): {e}") from None
            if match.unknown:
                notes.append(f"case {i + 1} ('{volume.GetName()}'): segments "
                             + ", ".join(f"'{n}'" for n in match.unknown) + " match no label and are left out")
            entries.append({"image": image.name, "label": f"case{i:03d}_label.nrrd",
                            "volume": volume.GetName(), "segmentation": segmentation.GetName()})
        colors = _segment_colors(pairs)
        labels = []
        for value, name in enumerate(label_names, start=1):
            entry = {"value": value, "name": name}
            if normalize_name(name) in colors:  # the model paints the class as the user drew it
                entry["color"] = colors[normalize_name(name)]
            labels.append(entry)
        datalist = {"name": "annotated cases from 3D Slicer", "labels": labels,
                    "training": entries, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path = folder / "datalist.json"
        path.write_text(json.dumps(datalist, indent=2), encoding="utf-8")
        return path


def segment_arguments(image, model_path, output, device: str = "auto", fast: bool = False,
                      extra_args: Sequence[str] = ()) -> list[str]:
    """The ``mim segment`` command line of :meth:`MiMLogicCore.start_segment` (without ``mim``).

    fast: add ``--fast`` (mimcore's fast profile: the network only on windows that hold part
    of the body, in OpenVINO fp32 where installed, else bf16 on CPUs with native bf16); the GUI's "Fast (CPU)" check
    box, on by default where no GPU was found (:func:`MiMSlicerLib.fields.default_fast`)."""
    argv = ["segment", str(image), "--model", str(model_path), "--output", str(output), "--device", str(device),
            "--progress", "json"]
    if fast:
        argv.append("--fast")
    return argv + [str(a) for a in extra_args]


def _segment_names(pairs) -> list[str]:
    """Segment names of all cases, first seen first, one per normalized name."""
    names, seen = [], set()
    for _volume, segmentation in pairs:
        for _id, name in segments(segmentation):
            if normalize_name(name) not in seen:
                seen.add(normalize_name(name))
                names.append(name)
    return names


def _segment_colors(pairs) -> dict[str, list[int]]:
    """``{normalized segment name: [r, g, b] 0-255}``, the first case's colour for each name."""
    colors: dict[str, list[int]] = {}
    for _volume, segmentation in pairs:
        seg = segmentation.GetSegmentation()
        for segment_id, name in segments(segmentation):
            key = normalize_name(name)
            if key not in colors:
                colors[key] = [int(round(min(1.0, max(0.0, c)) * 255)) for c in seg.GetSegment(segment_id).GetColor()]
    return colors


def _file_case_args(path: Path, label_names: list[str] | None) -> list[str]:
    """``mim finetune`` data options for a datalist file or a folder of cases."""
    names = ["--label-names", ",".join(f"{v}:{n}" for v, n in enumerate(label_names, start=1))] if label_names else []
    if path.is_file():
        return ["--datalist", str(path), *names]
    if not path.is_dir():
        raise MiMSlicerError(f"No annotated cases at {path}: choose a datalist JSON file or a folder of cases.")
    for listing in ("dataset.json", "datalist.json"):
        if (path / listing).is_file():
            return ["--datalist", str(path / listing), *names]
    for images, labels in (("imagesTr", "labelsTr"), ("images", "labels")):
        if (path / images).is_dir() and (path / labels).is_dir():
            return ["--images", str(path / images), "--label-dir", str(path / labels), *names]
    raise MiMSlicerError(f"{path} holds no cases mimcore can read: it needs a dataset.json/datalist.json, or the "
                         "sub-folders imagesTr/ + labelsTr/ (or images/ + labels/) with same-named files.")
