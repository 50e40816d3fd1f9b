"""Whole-volume segmentation with a model bundle, on exactly the input's grid.

``Segmenter(bundle).segment(volume)``:

1. preprocessing as the bundle says (MONAI): orientation (RAS), resampling to the
   model's spacing (bilinear), HU window clipped and scaled to [0, 1];
2. sliding-window inference with Gaussian blending, slab by slab
   (:class:`~mimcore.inference.window.WindowSegmenter`), optional flip TTA; with the
   ``fast`` profile (:mod:`mimcore.inference.profiles`) bf16 autocast on CPUs with native
   bf16, channels-last, and windows of air skipped (background; the body mask is found at
   low resolution, :mod:`mimcore.inference.body_region`);
3. optional keep-largest-connected-component per class (MONAI);
4. the label map is resampled (nearest neighbour, SimpleITK) onto the input volume's own
   grid: same size, spacing, origin and direction as the input.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import KeepLargestConnectedComponent, Orientation, ScaleIntensityRange, Spacing

from mimcore.data.preprocess import Preprocessing
from mimcore.data.regrid import labels_to_grid
from mimcore.data.transforms import volume_to_metatensor
from mimcore.data.volume_io import Volume
from mimcore.devices import resolve_device
from mimcore.errors import MimError
from mimcore.inference.body_region import body_mask, threshold_value
from mimcore.inference.openvino_net import OpenVINOUnavailable, compile_openvino
from mimcore.inference.profiles import autocast_dtype, choose_runtime, get_profile, openvino_dtype, precision_name
from mimcore.inference.window import WindowSegmenter
from mimcore.models import segnet

INFERENCE_DEFAULTS = {"overlap": 0.5, "sw_batch_size": 2, "tta_flips": False, "keep_largest": False}


def preprocess(vol: Volume, prep: "Preprocessing | dict", lazy: bool = False) -> MetaTensor:
    """Volume -> (1, X', Y', Z') float32 MetaTensor in [0, 1] at the model's orientation/spacing
    (its ``affine`` says where it lies), as ``prep`` (a :class:`Preprocessing` or a bundle's
    dict) describes. ``lazy``: only the pending geometry, nothing resampled
    (``peek_pending_shape()`` is the shape the full call returns)."""
    prep = Preprocessing.from_dict(prep)
    img = volume_to_metatensor(vol)
    img = Orientation(axcodes=prep.orientation, labels=None, lazy=lazy)(img)
    if prep.spacing:
        img = Spacing(pixdim=prep.spacing, mode="bilinear", lazy=lazy)(img)
    if lazy:
        return img
    return ScaleIntensityRange(a_min=prep.hu_min, a_max=prep.hu_max, b_min=0.0, b_max=1.0, clip=True)(img)


class Segmenter:
    """Runs one bundle's network on whole volumes. Settings left as None come from the
    bundle's ``inference`` section.

    Hooks (all optional): ``events(event, **fields)`` receives warnings; ``windows(n)`` is
    called after every n windows (progress); ``timer(stage)`` returns a context manager
    around each stage of :meth:`segment`: ``"prep"`` (preprocessing), ``"sw"`` (sliding
    window + argmax) and ``"post"`` (labels onto the input grid); ``on_slab`` and
    ``forward`` go to :class:`~mimcore.inference.window.WindowSegmenter`.

    ``precision``: ``auto``, ``fp32`` or ``bf16`` (:func:`~mimcore.inference.profiles.autocast_dtype`);
    ``profile``: ``reference`` (default) or ``fast`` (:data:`~mimcore.inference.profiles.PROFILES`);
    ``slab_budget_bytes``: the probability buffer of one slab (default: the profile's, else 1 GiB);
    ``runtime``: ``auto``, ``torch`` or ``openvino`` (:func:`~mimcore.inference.profiles.choose_runtime`);
    with ``auto`` a network OpenVINO cannot take runs in PyTorch and a ``note`` event says why.
    ``self.runtime`` is the runtime chosen, ``self.precision`` what the windows run in.
    """

    def __init__(self, bundle, device: str = "auto", overlap: float | None = None, sw_batch: int | None = None,
                 tta: bool | None = None, keep_largest: bool | None = None, precision: str = "auto",
                 events=None, windows=None, slab_budget_bytes: int | None = None, *, timer=None, on_slab=None,
                 forward=None, profile="reference", runtime="auto"):
        desc = bundle.description
        self.profile = get_profile(profile)
        settings = dict(INFERENCE_DEFAULTS, **desc.get("inference", {}))
        for key, value in (("overlap", overlap), ("sw_batch_size", sw_batch), ("tta_flips", tta),
                           ("keep_largest", keep_largest)):
            if value is not None:
                settings[key] = value
        if not 0 <= float(settings["overlap"]) < 1:
            raise MimError(f"overlap must be in [0, 1), got {settings['overlap']}")
        if int(settings["sw_batch_size"]) < 1:
            raise MimError(f"the window batch must be at least 1, got {settings['sw_batch_size']}")
        self.settings, self.labels = settings, bundle.labels
        self.prep = Preprocessing.from_dict(desc["preprocessing"])
        self.device = resolve_device(device)
        self.net = segnet.build(desc["architecture"])  # MiMSegNet, UNETR or SwinUNETR
        missing, unexpected = self.net.load_state_dict(bundle.state_dict(), strict=False)
        if missing or unexpected:
            raise MimError(f"the weights of {bundle.path} do not fit its model.json: {len(missing)} missing "
                           f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        self.net.eval().to(self.device)
        amp = autocast_dtype(self.device, precision, self.profile)
        cpu_amp = autocast_dtype(torch.device("cpu"), precision, self.profile)
        self.n_classes = segnet.out_channels(self.net)
        roi = segnet.input_size(self.net)
        ov_amp = openvino_dtype(precision, cpu_amp)  # --precision auto: fp32, the reference labels
        self.runtime = choose_runtime(runtime, self.device, self.profile, roi, ov_amp)
        window_net = self.net
        if self.runtime == "openvino":
            try:
                window_net = compile_openvino(self.net, roi, ov_amp, desc["weights"]["sha256"], desc["architecture"])
                cpu_amp = ov_amp
            except OpenVINOUnavailable as err:
                if runtime == "openvino":
                    raise MimError(f"--runtime openvino: {err}") from None
                self.runtime = "torch"
                (events or (lambda *a, **k: None))(
                    "note", message=f"{err}: the network runs in PyTorch in {precision_name(cpu_amp)}")
        #: what the windows run in on the chosen device: ``fp32``, ``bf16`` or ``fp16``
        self.precision = precision_name(amp if self.device.type == "cuda" else cpu_amp)
        channels_last = self.profile.channels_last and self.runtime == "torch"
        if channels_last:
            self.net.to(memory_format=torch.channels_last_3d)
        self.timer = timer or (lambda stage: contextlib.nullcontext())
        self.window = WindowSegmenter(window_net, roi, self.device, float(settings["overlap"]),
                                      int(settings["sw_batch_size"]), bool(settings["tta_flips"]), amp,
                                      slab_budget_bytes or self.profile.slab_budget_bytes or 1 << 30,
                                      on_event=events, on_windows=windows, on_slab=on_slab, forward=forward,
                                      cpu_amp_dtype=cpu_amp,
                                      channels_last=channels_last)

    def model_space_shape(self, vol: Volume) -> tuple[int, int, int]:
        """The (X', Y', Z') shape preprocessing gives ``vol``, exactly (MONAI's lazy transforms
        compute it without resampling)."""
        img = preprocess(vol, self.prep, lazy=True)
        return tuple(int(n) for n in img.peek_pending_shape())

    def body_region(self, img: torch.Tensor) -> torch.Tensor | None:
        """Preprocessed image (1, X', Y', Z') -> the body mask (X', Y', Z') bool whose windows the
        ``fast`` profile computes (None: every window)."""
        if not self.profile.skip_air:
            return None
        return body_mask(img, threshold_value(self.prep.hu_min, self.prep.hu_max))

    def total_windows(self, vol: Volume) -> int:
        """Windows visited for ``vol`` (for progress bars; skipped air windows count as done)."""
        return self.window.total_windows(self.model_space_shape(vol), self.n_classes)

    def segment_model_space(self, vol: Volume) -> tuple[np.ndarray, np.ndarray]:
        """-> (labels (X', Y', Z') at the model's spacing/orientation, its RAS affine (4, 4))."""
        with self.timer("prep"):
            img = preprocess(vol, self.prep)
        with self.timer("sw"):
            image = img.as_tensor()
            labels = self.window(image, self.n_classes, self.body_region(image))
        if self.settings["keep_largest"]:
            values = [lab["value"] for lab in self.labels]
            keep = KeepLargestConnectedComponent(applied_labels=values, is_onehot=False, independent=True)
            labels = np.asarray(keep(torch.from_numpy(labels[None].astype(np.int64)))[0]).astype(labels.dtype)
        return labels, np.asarray(img.affine, dtype=np.float64)

    def segment(self, vol: Volume) -> np.ndarray:
        """Volume -> label map (X, Y, Z) on the volume's own grid (uint8, or uint16 past 255 labels)."""
        labels, affine = self.segment_model_space(vol)
        with self.timer("post"):
            return labels_to_grid(labels, affine, vol)


def ras_order(vol: Volume, per_axis) -> np.ndarray:
    """A per-array-axis quantity (shape, spacing) in the axis order after ``Orientation("RAS")``."""
    order = np.abs(vol.direction_ras).argmax(axis=0)  # array axis j runs mostly along RAS axis order[j]
    out = np.empty(3)
    out[order] = np.asarray(per_axis, dtype=float)
    return out
