"""Where the local model library lives and how its entries are named.

Standard library only (``platformdirs`` on first use): the 3D Slicer module's GUI process
reads these rules without importing torch or the rest of :mod:`mimcore.bundles`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ENV_LIBRARY = "MIM_MODELS_DIR"
ENV_REGISTRY = "MIM_MODEL_REGISTRY"
DESCRIPTION_FILE = "model.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")  # a library name (a folder's)


def library_dir(library: str | os.PathLike | None = None) -> Path:
    """The library folder: ``library`` if given, else ``$MIM_MODELS_DIR``, else the user data
    folder (``platformdirs``: ImportError where it is not installed)."""
    if library is not None:
        return Path(library).expanduser()
    if os.environ.get(ENV_LIBRARY):
        return Path(os.environ[ENV_LIBRARY]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("mimcore")) / "models"


def cache_dir(library: str | os.PathLike | None = None) -> Path:
    """The library's cache (downloads, extracted zips): ``<library>/.cache``."""
    return library_dir(library) / ".cache"


def slugify(name: str) -> str:
    """A library folder name made from a model name: ``"Liver (v2)"`` -> ``"Liver-v2"``."""
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(name)).strip("-.")[:100]
    return slug or "model"
