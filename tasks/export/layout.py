"""The files of an export directory, and how a directory is published complete or not at all.

Kept apart from the exporter so that a reader of exports (``strata serve``) imports these names without
pulling in the exporter's torch, timm and method code.

An export is written into a sibling ``<name>.partial-<pid>`` folder; its manifest ``export.json`` (every
file's size and sha256) is written last, and the folder is renamed into place in one ``os.replace``. So
``<name>`` is either absent or complete (its manifest proves it), a killed export leaves only a
``.partial-*`` folder that nothing reads, and the next export of that folder removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from strata.models.errors import UserError

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.json"
META_FILE = "model.json"
MANIFEST_FILE = "export.json"
EXPORT_FILES = frozenset({MODEL_FILE, LABELS_FILE, META_FILE, MANIFEST_FILE, f"{MODEL_FILE}.data"})
PARTIAL = ".partial-"  # <name>.partial-<pid>: being written by process <pid>
REPLACED = ".replaced-"  # <name>.replaced-<pid>: the previous export, moved aside for one rename


class ExportFolderError(UserError, RuntimeError):
    """The export's output folder holds files that are not an export; nothing was written there."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(partial(handle.read, 1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record every file of ``directory`` (size and sha256); written last, it marks the export complete."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {"files": {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def manifest_problem(directory: Path, hashes: bool = False) -> str | None:
    """What keeps ``directory`` from being a complete published export (None: nothing).

    Sizes are compared always (cheap enough to poll); with ``hashes`` every file's sha256 too.
    """
    try:
        listed = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (the export did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST_FILE} is unreadable ({exc})"
    for name, entry in listed.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}"
        if hashes and sha256(path) != entry["sha256"]:
            return f"{name} differs from the sha256 the manifest records"
    return None


@contextmanager
def published(out: Path) -> Iterator[Path]:
    """A fresh ``<out>.partial-<pid>`` folder to write the export into; renamed to ``out`` once the block ends
    (after the manifest is written), removed if it raises. An earlier export at ``out`` is replaced."""
    out = Path(out)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    folder = out.with_name(f"{out.name}{PARTIAL}{os.getpid()}")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        yield folder
        write_manifest(folder)
        if out.exists():
            aside = out.with_name(f"{out.name}{REPLACED}{os.getpid()}")
            os.replace(out, aside)
            os.replace(folder, out)
            shutil.rmtree(aside)
        else:
            os.replace(folder, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale(out: Path) -> list[Path]:
    """Remove what killed exports of ``out`` left (``.partial-*``, ``.replaced-*`` of processes no longer
    running); returns them."""
    stale = []
    for marker in (PARTIAL, REPLACED):
        for folder in out.parent.glob(f"{out.name}{marker}*") if out.parent.is_dir() else []:
            pid = folder.name.rpartition("-")[2]
            if not pid.isdigit() or not _running(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
                stale.append(folder)
    return stale


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _check_replaceable(out: Path) -> None:
    """Replace only an earlier export: a folder holding anything else is the user's, never deleted."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportFolderError(f"{out} exists and is not a folder; choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
    if foreign:
        raise ExportFolderError(
            f"{out} holds files that are not an export ({', '.join(foreign[:5])}); "
            f"choose an empty or new folder for --out"
        )
