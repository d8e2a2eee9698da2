"""Validation of a batch of labelled images before anything is written.

A batch is an ImageFolder tree (``class/*.jpg`` or ``train/class/…`` + ``test/class/…``) or a
.zip/.tar(.gz) of one. Every problem is collected, so the data team gets one report listing all of
them instead of fixing one file per attempt. A valid batch becomes a ``BatchPlan``: each file's
class, split, content hash and destination, and a batch id derived from that content.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import tempfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from strata.models.errors import UserError
from strata.tasks.data.readers import IMAGE_SUFFIXES

ALLOWED_FORMATS = {"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"}
CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+-]{0,63}$")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


class BatchRejectedError(UserError, ValueError):
    """The batch fails validation; ``problems`` lists every reason, the message shows them all."""

    def __init__(self, source: Path | str, problems: list[str]):
        self.problems = problems
        listing = "; ".join(problems)
        super().__init__(f"batch {source} rejected, nothing was written ({len(problems)} problems): {listing}")


@dataclass(frozen=True)
class Limits:
    """Bounds on what a batch may hold; the pixel bound rejects decompression bombs."""

    min_images_per_class: int = 2
    max_file_bytes: int = 50 * 2**20
    max_side: int = 10_000
    max_pixels: int = 40_000_000
    max_archive_bytes: int = 4 * 2**30
    max_archive_members: int = 1_000_000


@dataclass(frozen=True)
class PlannedFile:
    source: Path
    split: str  # "train" | "test"
    class_name: str
    sha256: str

    @property
    def destination(self) -> str:
        return f"{self.split}/{self.class_name}/{self.sha256[:20]}{self.source.suffix.lower()}"


@dataclass(frozen=True)
class BatchPlan:
    """A validated batch: where every file goes, and the id its content gives it."""

    files: tuple[PlannedFile, ...]
    split: dict = field(default_factory=dict)

    @property
    def batch_id(self) -> str:
        listing = "\n".join(sorted(f"{f.destination} {f.sha256}" for f in self.files))
        return "batch-" + hashlib.sha256(listing.encode()).hexdigest()[:12]

    @property
    def classes(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = defaultdict(lambda: {"train": 0, "test": 0})
        for f in self.files:
            counts[f.class_name][f.split] += 1
        return {name: counts[name] for name in sorted(counts)}


@contextmanager
def unpacked(source: Path, limits: Limits = Limits()) -> Iterator[Path]:
    """The batch as a folder: a folder as is, an archive checked member by member and extracted to a temp dir."""
    if source.is_symlink():
        raise BatchRejectedError(source, [f"{source} is a symbolic link; pass the real folder or archive"])
    if source.is_dir():
        yield source
        return
    name = source.name.lower()
    if not source.is_file() or not name.endswith(ARCHIVE_SUFFIXES):
        raise BatchRejectedError(source, [f"{source} is neither a folder nor a .zip/.tar/.tar.gz archive"])
    with tempfile.TemporaryDirectory(prefix="strata-batch-") as tmp:
        root = Path(tmp)
        if name.endswith(".zip"):
            _extract_zip(source, root, limits)
        else:
            _extract_tar(source, root, limits)
        yield root


def _member_problem(name: str) -> str | None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name):
        return f"archive member {name!r} has an absolute path"
    if ".." in path.parts:
        return f"archive member {name!r} escapes its folder (..)"
    if "\x00" in name:
        return f"archive member {name!r} contains a NUL byte"
    return None


def _extract_zip(source: Path, root: Path, limits: Limits) -> None:
    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
            # orig_filename: zipfile cuts ``filename`` at a NUL, which would hide the NUL and merge members
            problems = [p for m in members if (p := _member_problem(m.orig_filename))]
            problems += [
                f"archive member {m.filename!r} is a symbolic link"
                for m in members
                if (m.external_attr >> 16) & 0o170000 == 0o120000
            ]
            problems += _size_problems(len(members), sum(m.file_size for m in members), limits)
            if problems:
                raise BatchRejectedError(source, problems)
            archive.extractall(root)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BatchRejectedError(source, [f"cannot read archive {source.name}: {exc}"]) from exc


def _extract_tar(source: Path, root: Path, limits: Limits) -> None:
    try:
        with tarfile.open(source) as archive:
            members = archive.getmembers()
            problems = [p for m in members if (p := _member_problem(m.name))]
            problems += [
                f"archive member {m.name!r} is a link or special file" for m in members if not (m.isfile() or m.isdir())
            ]
            problems += _size_problems(len(members), sum(m.size for m in members), limits)
            if problems:
                raise BatchRejectedError(source, problems)
            archive.extractall(root, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise BatchRejectedError(source, [f"cannot read archive {source.name}: {exc}"]) from exc


def _size_problems(count: int, total: int, limits: Limits) -> list[str]:
    problems = []
    if count > limits.max_archive_members:
        problems.append(f"archive has {count} members (limit {limits.max_archive_members})")
    if total > limits.max_archive_bytes:
        problems.append(f"archive unpacks to {total} bytes (limit {limits.max_archive_bytes})")
    return problems


def plan_batch(
    root: Path, test_fraction: float = 0.25, seed: int = 0, limits: Limits = Limits(), label: str | Path | None = None
) -> BatchPlan:
    """Validate the ImageFolder tree at ``root`` and plan its layout, or raise BatchRejectedError."""
    label = label or root
    root = _unwrap(root)
    problems = [f"{p.relative_to(root)} is a symbolic link" for p in sorted(root.rglob("*")) if p.is_symlink()]
    given_split = (root / "train").is_dir() and (root / "test").is_dir()
    splits = {"train": root / "train", "test": root / "test"} if given_split else {"all": root}
    entries: list[tuple[Path, str, str]] = []  # file, split, class
    for split, folder in splits.items():
        problems += [
            f"{p.relative_to(root)}: files must sit in a class folder"
            for p in _visible(folder)
            if not p.is_dir() and not p.is_symlink()
        ]
        for class_dir in (p for p in _visible(folder) if p.is_dir() and not p.is_symlink()):
            if not CLASS_NAME.fullmatch(class_dir.name) or class_dir.name in {".", ".."}:
                problems.append(
                    f"class name {class_dir.name!r} is not safe as a folder name "
                    f"(letters, digits, space, _ . + -; at most 64 characters)"
                )
                continue
            for path in _visible(class_dir):
                if path.is_dir():
                    problems.append(f"{path.relative_to(root)}: nested folders inside a class are not allowed")
                elif not path.is_symlink():
                    entries.append((path, split, class_dir.name))
    hashes: dict[Path, str] = {}
    for path, _, _ in entries:
        problem, digest = _check_image(path, limits)
        if problem:
            problems.append(f"{path.relative_to(root)}: {problem}")
        else:
            hashes[path] = digest
    problems += _duplicates(hashes, root)
    problems += _count_problems(entries, given_split, limits)
    if given_split and (set(c for _, s, c in entries if s == "train") != set(c for _, s, c in entries if s == "test")):
        problems.append("train/ and test/ must hold the same classes")
    if problems:
        raise BatchRejectedError(label, problems)
    if given_split:
        files = [PlannedFile(p, s, c, hashes[p]) for p, s, c in entries]
        return BatchPlan(tuple(files), {"kind": "given"})
    files = _seeded_split(entries, hashes, test_fraction, seed)
    return BatchPlan(tuple(files), {"kind": "seeded", "test_fraction": test_fraction, "seed": seed})


def _unwrap(root: Path) -> Path:
    """Step into a single wrapping folder (``digits.zip`` holding ``digits/<class>/…``)."""
    children = list(_visible(root))
    while (
        len(children) == 1
        and children[0].is_dir()
        and not children[0].is_symlink()
        and all(c.is_dir() for c in _visible(children[0]))
        and children[0].name not in {"train", "test"}
    ):
        root = children[0]
        children = list(_visible(root))
    return root


def _visible(folder: Path) -> Iterator[Path]:
    """Folder entries, minus hidden files such as .DS_Store."""
    return (p for p in sorted(folder.iterdir()) if not p.name.startswith("."))


def _check_image(path: Path, limits: Limits) -> tuple[str | None, str]:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an allowed image type ({', '.join(sorted(IMAGE_SUFFIXES))})", ""
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        return f"{size} bytes is over the {limits.max_file_bytes}-byte limit", ""
    data = path.read_bytes()
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.format not in ALLOWED_FORMATS:
                return f"format {image.format} is not allowed ({', '.join(sorted(ALLOWED_FORMATS))})", ""
            if max(width, height) > limits.max_side or width * height > limits.max_pixels:
                return f"{width}x{height} pixels is over the size limit (possible decompression bomb)", ""
            image.verify()
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # Pillow raises many types for corrupt data; each is a rejection
        return f"does not decode as an image ({type(exc).__name__}: {exc})", ""
    return None, hashlib.sha256(data).hexdigest()


def _duplicates(hashes: dict[Path, str], root: Path) -> list[str]:
    by_hash: dict[str, list[Path]] = defaultdict(list)
    for path, digest in hashes.items():
        by_hash[digest].append(path)
    return [
        f"identical images: {', '.join(str(p.relative_to(root)) for p in paths)}"
        for paths in by_hash.values()
        if len(paths) > 1
    ]


def _count_problems(entries: list[tuple[Path, str, str]], given_split: bool, limits: Limits) -> list[str]:
    if not entries:
        return ["the batch holds no images"]
    per_class = Counter(c for _, _, c in entries)
    problems = [
        f"class {name!r} has {n} images; at least {limits.min_images_per_class} are needed"
        for name, n in sorted(per_class.items())
        if n < limits.min_images_per_class
    ]
    if given_split:
        per_split = Counter((s, c) for _, s, c in entries)
        problems += [
            f"class {name!r} has no {split} images"
            for name in sorted(per_class)
            for split in ("train", "test")
            if not per_split[(split, name)]
        ]
    return problems


def _seeded_split(
    entries: list[tuple[Path, str, str]], hashes: dict[Path, str], test_fraction: float, seed: int
) -> list[PlannedFile]:
    """Per class, a seeded permutation of the files in content order; at least one image on each side."""
    by_class: dict[str, list[Path]] = defaultdict(list)
    for path, _, name in entries:
        by_class[name].append(path)
    files = []
    rng = np.random.default_rng(seed)
    for name in sorted(by_class):
        paths = sorted(by_class[name], key=lambda p: hashes[p])
        order = rng.permutation(len(paths))
        n_test = min(len(paths) - 1, max(1, round(test_fraction * len(paths))))
        for rank, index in enumerate(order):
            files.append(PlannedFile(paths[index], "test" if rank < n_test else "train", name, hashes[paths[index]]))
    return files
