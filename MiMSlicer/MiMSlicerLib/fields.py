"""Small decisions of the GUI's fields, as pure functions the widget calls (and tests check).

* Path parameters: Slicer's ``parameterNodeWrapper`` stores an unset ``pathlib.Path`` as
  ``Path()`` == ``Path(".")`` and writes ``"."`` into the ``ctkPathLineEdit``. The module
  keeps the parameter type (the wrapper connects a path field to nothing else) and shows
  an unset path as an empty field: :func:`path_text` is what the field shows,
  :func:`path_is_set` whether a parameter holds a path, :func:`path_value` what a typed
  text means.
* "Fast (CPU)" (``mim segment --fast``): :func:`default_fast` - on when no GPU was found;
  :func:`gpu_requested` - what a device setting says before the check; :func:`runtime_text`
  - where a segment job ran its network.
* PyTorch installs: :func:`restart_needed` - whether Slicer must restart to use the
  newly installed packages.
* :func:`slicer_version_problem` - what to tell a user of a Slicer older than the module supports.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_UNSET_TEXTS = ("", ".")


def path_is_set(value) -> bool:
    """True when a path parameter holds a path (None, ``""``, ``Path()`` i.e. ``"."`` are unset)."""
    return value is not None and str(value).strip() not in _UNSET_TEXTS


def path_text(value) -> str:
    """What a path field shows for a parameter value: ``""`` when unset, else the path."""
    return str(value) if path_is_set(value) else ""


def path_value(text: str | os.PathLike | None) -> Path:
    """The parameter value for a field's text (``Path()`` - unset - for an empty field)."""
    return Path(str(text).strip()) if path_is_set(text) else Path()


def default_fast(gpu_found: bool | None) -> bool:
    """Whether the "Fast (CPU)" box starts ticked: yes when the device check found no GPU
    (``gpu_found`` False) or has not run (None: the CPU is the safe guess - an untested
    GPU setup is found by the device check, which then unticks it)."""
    return not gpu_found


def gpu_requested(device: str) -> bool | None:
    """What a device setting says about a GPU before any check: ``cpu`` no (False), ``cuda``,
    ``cuda:N`` or ``mps`` yes (True), ``auto`` unknown (None: the device check decides)."""
    kind = str(device or "auto").split(":")[0].lower()
    if kind == "cpu":
        return False
    if kind in ("cuda", "mps"):
        return True
    return None


def runtime_text(events) -> str:
    """", network in OpenVINO fp32" / ", network in PyTorch bf16" from a segment job's ``start``
    event (``runtime``, ``precision``), "" when the job did not say (an older mimcore)."""
    start = next((e for e in events if e.get("event") == "start"), {})
    runtime = start.get("runtime")
    names = {"openvino": "OpenVINO", "torch": "PyTorch"}
    precision = f" {start['precision']}" if start.get("precision") else ""
    return f", network in {names.get(runtime, runtime)}{precision}" if runtime else ""


def gpu_found(check) -> bool | None:
    """From a :class:`MiMSlicerLib.dependencies.DeviceCheck` of ``auto``: True if it ran on a
    GPU (cuda or mps), False if on the CPU, None if the check failed."""
    if check is None or not getattr(check, "ok", False):
        return None
    return str(check.device or "").split(":")[0] in ("cuda", "mps")


def restart_needed(installed: Iterable[str], loaded_before: Iterable[str]) -> list[str]:
    """The installed distributions whose import name this process had already imported before
    the install (e.g. ``torch`` imported by another extension): their new version is only
    used after Slicer restarts. ``installed``: requirement or distribution names
    (``"torch>=2.2"``); ``loaded_before``: ``sys.modules`` keys as they were."""
    loaded = {name.split(".")[0].lower() for name in loaded_before}
    aliases = {"scikit-image": "skimage", "pyyaml": "yaml", "pillow": "pil", "simpleitk": "simpleitk"}
    found = []
    for requirement in installed:
        dist = str(requirement).split(";")[0].strip()
        for sep in "<>=!~[ ":
            dist = dist.split(sep)[0]
        dist = dist.lower()
        module = aliases.get(dist, dist.replace("-", "_"))
        if dist and module in loaded and dist not in found:
            found.append(dist)
    return found


MINIMUM_SLICER = (5, 10)  # the first Slicer with Python >= 3.10 (5.10 ships 3.12), which mimcore needs
MINIMUM_PYTHON = (3, 10)


def slicer_version_problem(slicer_version: tuple[int, int], python_version: tuple[int, int]) -> str | None:
    """None when this Slicer can run MiMSlicer, else what is wrong and what to do."""
    if tuple(python_version[:2]) < MINIMUM_PYTHON or tuple(slicer_version[:2]) < MINIMUM_SLICER:
        return (f"MiMSlicer needs 3D Slicer {MINIMUM_SLICER[0]}.{MINIMUM_SLICER[1]} or newer (its Python "
                f"{MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]}+ runs the mimcore jobs); this is Slicer "
                f"{slicer_version[0]}.{slicer_version[1]} with Python {python_version[0]}.{python_version[1]}. "
                "Install a newer Slicer from https://download.slicer.org.")
    return None
