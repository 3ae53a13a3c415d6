"""A folder `medgen export` wrote, as `load_pipeline` reads it (the writer: `medgen.export`).

An export folder holds the run's inference files under the run's own names (`model/`,
`autoencoder/`), so `DiffusionPipeline.from_run` reads it as it reads a run, plus
`medgen_export.json`: every file of the folder with its sha256. Before loading, the files
sampling reads are checked against it, so a truncated copy or a damaged download is refused with
the file's name instead of loading other weights. The model card and the other formats in the
folder (diffusers' `unet/`, the MONAI bundle) are not checked: a user may edit the card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medgen.errors import RunError
from medgen.io import sha256_file

EXPORT_MANIFEST = "medgen_export.json"
EXPORT_FORMAT = "medgen-export"
EXPORT_FORMAT_VERSION = 1
SAMPLING_FILES = ("model/", "autoencoder/")  # what `from_run` reads: checked on every load
REQUIRED = ("model/config.json", "model/model.safetensors")


def is_export(folder: str | os.PathLike) -> bool:
    return (Path(folder) / EXPORT_MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's `medgen_export.json`; RunError naming it when it is not one medgen can read."""
    path = Path(folder) / EXPORT_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path} cannot be read as JSON ({e}): the export folder is damaged; export the run again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT or not isinstance(manifest.get("files"), dict):
        raise RunError(f"{path} is not a medgen export manifest (expected format {EXPORT_FORMAT!r} and a `files` table)")
    if int(manifest.get("format_version", 0)) > EXPORT_FORMAT_VERSION:
        raise RunError(f"{path} is export format {manifest['format_version']}, newer than this medgen reads "
                       f"({EXPORT_FORMAT_VERSION}); upgrade medgen")
    return manifest


def check_export(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of an export folder once every file sampling reads is present and unchanged
    (RunError naming the first that is not); None for any other folder (a run folder)."""
    folder = Path(folder)
    if not is_export(folder):
        return None
    manifest = read_manifest(folder)
    files = manifest["files"]
    for name in REQUIRED:
        if name not in files:
            raise RunError(f"{folder / EXPORT_MANIFEST} does not list {name}: not a complete medgen export; export the run again")
    for name, digest in sorted(files.items()):
        if not name.startswith(SAMPLING_FILES):
            continue
        path = folder / name
        if not path.is_file():
            raise RunError(f"{path} is missing: the export folder is incomplete ({EXPORT_MANIFEST} lists it); "
                           f"copy the whole folder again or export the run again")
        if sha256_file(path) != digest:
            raise RunError(f"{path} does not match its sha256 in {EXPORT_MANIFEST}: the file was changed or damaged "
                           f"in transit; copy it again or export the run again")
    return manifest
