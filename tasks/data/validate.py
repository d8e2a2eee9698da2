"""Validation of a batch of labelled images before anything is written.

A batch is an ImageFolder tree (``class/*.jpg`` or ``train/class/…`` + ``test/class/…``) or a .zip or
.tar (plain, .gz, .bz2, .xz) of one. Every problem is collected, so the data team gets one report listing
all of them instead of fixing one file per attempt. A valid batch becomes a ``BatchPlan``: each file's
class, split, content hash and destination, and a batch id derived from that content.

Archives are checked member by member from their headers (names, kinds, declared sizes), then extracted
by Strata itself in chunks with the bytes counted as they are written: a member or archive that unpacks
past its limit is stopped before the chunk that would cross it, whatever its header claimed, so an
archive bomb never fills the disk. Every image is decoded by :func:`strata.models.images.decode`, the
decoder training and serving use, so a batch is accepted exactly when its pixels can be learned from.
"""

from __future__ import annotations

import hashlib
import lzma
import re
import tarfile
import tempfile
import unicodedata
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np

from strata.models.errors import UserError
from strata.models.images import IMAGE_SUFFIXES, MAX_PIXELS, ImageError, check_size, decode, read_header

CLASS_PUNCTUATION = frozenset(" _.+-")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# What file managers leave behind: skipped like any hidden file, in folders and in archives.
JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
CHUNK_BYTES = 2**20
_ARCHIVE_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, RuntimeError, NotImplementedError)


class BatchRejectedError(UserError, ValueError):
    """The batch fails validation; ``problems`` lists every reason, the message shows them all."""

    def __init__(self, source: Path | str, problems: list[str]):
        self.problems = problems
        listing = "; ".join(problems)
        super().__init__(f"batch {source} rejected, nothing was written ({len(problems)} problems): {listing}")


@dataclass(frozen=True)
class Limits:
    """Bounds on what a batch may hold; the pixel bounds reject decompression bombs before decoding."""

    min_images_per_class: int = 2
    max_file_bytes: int = 50 * 2**20  # also the most one archive member may unpack to
    max_side: int = 10_000
    max_pixels: int = MAX_PIXELS
    max_batch_pixels: int = 16_000_000_000  # what 4 GiB of compressed photos decode to, about
    max_archive_bytes: int = 4 * 2**30
    max_archive_members: int = 1_000_000
    max_name_bytes: int = 255  # one path component (ext4, APFS, NTFS)
    max_path_bytes: int = 4096  # a whole member path (Linux PATH_MAX)


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
        raise BatchRejectedError(
            source, [f"{source} is neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})"]
        )
    with tempfile.TemporaryDirectory(prefix="strata-batch-") as tmp:
        root = Path(tmp)
        if name.endswith(".zip"):
            _extract_zip(source, root, limits)
        else:
            _extract_tar(source, root, limits)
        yield root


def _parts(name: str) -> tuple[str, ...]:
    """A member's path components; a backslash separates them too (Windows tools write ``cls\\img.png``)."""
    return PurePosixPath(name.replace("\\", "/")).parts


def _skipped(name: str) -> bool:
    """Finder's ``__MACOSX/`` and ``._*`` companions, ``.DS_Store`` and other hidden or junk entries."""
    return any(part.startswith(".") or part in JUNK_NAMES for part in _parts(name))


def _shown(name: str) -> str:
    """A member name for a message: whole when short, else its start and its length."""
    size = len(name.encode("utf-8", "surrogateescape"))
    return repr(name) if len(name) <= 120 else f"{name[:100]!r}… ({size} bytes)"


def _member_problem(name: str, limits: Limits) -> str | None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name):
        return f"archive member {name!r} has an absolute path"
    if ".." in path.parts:
        return f"archive member {name!r} escapes its folder (..)"
    if "\x00" in name:
        return f"archive member {name!r} contains a NUL byte"
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_path_bytes:
        return f"archive member {_shown(name)} has a path over {limits.max_path_bytes} bytes; shorten it"
    if any(len(part.encode("utf-8", "surrogateescape")) > limits.max_name_bytes for part in path.parts):
        return f"archive member {_shown(name)} has a name over {limits.max_name_bytes} bytes; shorten it"
    return None


def _listing_problems(files: list[str], folders: list[str]) -> list[str]:
    """Members that would land on one path: a name given twice, or a file where a folder must be."""
    paths = Counter(PurePosixPath(*_parts(name)) for name in files)
    problems = [f"archive member {path.as_posix()!r} appears {n} times" for path, n in paths.items() if n > 1]
    needed = {parent for path in paths for parent in path.parents} | {PurePosixPath(*_parts(f)) for f in folders}
    problems += [f"archive member {path.as_posix()!r} is both a file and a folder" for path in paths if path in needed]
    return problems


def _size_problems(sizes: dict[str, int], limits: Limits) -> list[str]:
    """The limits checked on the sizes the headers declare; ``_write`` checks them again on the real bytes."""
    problems = []
    if len(sizes) > limits.max_archive_members:
        problems.append(f"archive has {len(sizes)} members (limit {limits.max_archive_members})")
    problems += [
        f"archive member {_shown(name)} unpacks to {size} bytes (limit {limits.max_file_bytes} per file)"
        for name, size in sizes.items()
        if size > limits.max_file_bytes
    ]
    if sum(sizes.values()) > limits.max_archive_bytes:
        problems.append(f"archive unpacks to {sum(sizes.values())} bytes (limit {limits.max_archive_bytes})")
    return problems


class _Extraction:
    """Writes members under ``root`` in chunks, counting bytes; stops before a chunk that crosses a limit."""

    def __init__(self, source: Path, root: Path, limits: Limits):
        self.source, self.root, self.limits, self.total = source, root, limits, 0

    def folder(self, name: str) -> None:
        self.root.joinpath(*_parts(name)).mkdir(parents=True, exist_ok=True)

    def file(self, name: str, stream: IO[bytes]) -> None:
        target = self.root.joinpath(*_parts(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        try:
            with open(target, "xb") as out:
                while chunk := stream.read(CHUNK_BYTES):
                    size += len(chunk)
                    if size > self.limits.max_file_bytes:
                        raise BatchRejectedError(
                            self.source,
                            [
                                f"archive member {_shown(name)} unpacks to more than {self.limits.max_file_bytes} "
                                f"bytes (limit per file; its header said less)"
                            ],
                        )
                    if self.total + size > self.limits.max_archive_bytes:
                        raise BatchRejectedError(
                            self.source,
                            [
                                f"archive unpacks to more than {self.limits.max_archive_bytes} bytes "
                                f"(stopped at member {_shown(name)}; its headers said less)"
                            ],
                        )
                    out.write(chunk)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        self.total += size


def _extract_zip(source: Path, root: Path, limits: Limits) -> None:
    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
            # orig_filename: zipfile cuts ``filename`` at a NUL, which would hide the NUL and merge members
            problems = [p for m in members if (p := _member_problem(m.orig_filename, limits))]
            problems += [
                f"archive member {m.filename!r} is a symbolic link"
                for m in members
                if (m.external_attr >> 16) & 0o170000 == 0o120000
            ]
            kept = [m for m in members if not _skipped(m.orig_filename)]
            folders = [m for m in kept if m.orig_filename.endswith(("/", "\\"))]
            files = [m for m in kept if m not in folders]
            problems += _listing_problems([m.orig_filename for m in files], [m.orig_filename for m in folders])
            problems += _size_problems({m.orig_filename: m.file_size for m in files}, limits)
            if problems:
                raise BatchRejectedError(source, problems)
            extraction = _Extraction(source, root, limits)
            for m in folders:
                extraction.folder(m.orig_filename)
            for m in files:
                with archive.open(m) as stream:
                    extraction.file(m.orig_filename, stream)
    except (zipfile.BadZipFile, *_ARCHIVE_ERRORS) as exc:
        raise BatchRejectedError(source, [f"cannot read archive {source.name}: {exc}"]) from exc


def _extract_tar(source: Path, root: Path, limits: Limits) -> None:
    try:
        with tarfile.open(source) as archive:
            members = archive.getmembers()
            problems = [p for m in members if (p := _member_problem(m.name, limits))]
            problems += [
                f"archive member {m.name!r} is a link or special file" for m in members if not (m.isfile() or m.isdir())
            ]
            kept = [m for m in members if not _skipped(m.name)]
            folders = [m for m in kept if m.isdir()]
            files = [m for m in kept if m.isfile()]
            problems += _listing_problems([m.name for m in files], [m.name for m in folders])
            problems += _size_problems({m.name: m.size for m in files}, limits)
            if problems:
                raise BatchRejectedError(source, problems)
            extraction = _Extraction(source, root, limits)
            for m in folders:
                extraction.folder(m.name)
            for m in files:
                stream = archive.extractfile(m)
                assert stream is not None  # a regular file always has a stream
                with stream:
                    extraction.file(m.name, stream)
    except (tarfile.TarError, *_ARCHIVE_ERRORS) as exc:
        raise BatchRejectedError(source, [f"cannot read archive {source.name}: {exc}"]) from exc


def plan_batch(
    root: Path, test_fraction: float = 0.25, seed: int = 0, limits: Limits = Limits(), label: str | Path | None = None
) -> BatchPlan:
    """Validate the ImageFolder tree at ``root`` and plan its layout, or raise BatchRejectedError."""
    label = label or root
    root = _unwrap(root)
    problems = [f"{p.relative_to(root)} is a symbolic link" for p in sorted(root.rglob("*")) if p.is_symlink()]
    given_split = (root / "train").is_dir() and (root / "test").is_dir()
    splits = {"train": root / "train", "test": root / "test"} if given_split else {"all": root}
    entries: list[tuple[Path, str, str]] = []  # file, split, class (its NFC name)
    for split, folder in splits.items():
        problems += [
            f"{p.relative_to(root)}: files must sit in a class folder"
            for p in _visible(folder)
            if not p.is_dir() and not p.is_symlink()
        ]
        class_dirs = [p for p in _visible(folder) if p.is_dir() and not p.is_symlink()]
        problems += _lookalike_classes(class_dirs)
        for class_dir in class_dirs:
            name = unicodedata.normalize("NFC", class_dir.name)
            if not _safe_class_name(name):
                problems.append(
                    f"class name {class_dir.name!r} is not safe as a folder name "
                    f"(letters, digits, space, _ . + -; at most 64 characters)"
                )
                continue
            images = 0
            for path in _visible(class_dir):
                if path.is_dir():
                    problems.append(f"{path.relative_to(root)}: nested folders inside a class are not allowed")
                elif not path.is_symlink():
                    entries.append((path, split, name))
                    images += 1
            if not images:
                problems.append(f"class folder {class_dir.relative_to(root)} holds no images; add some or remove it")
    hashes: dict[Path, str] = {}
    problems += _image_problems(entries, root, limits, hashes)
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


def _safe_class_name(name: str) -> bool:
    """1-64 letters or digits (any script), space, ``_ . + -``, starting with a letter or digit."""
    return 0 < len(name) <= 64 and name[0].isalnum() and all(c.isalnum() or c in CLASS_PUNCTUATION for c in name)


def class_key(name: str) -> str:
    """What people read in a class name: two names with one key are one class to them (case, NFC/NFD, spaces)."""
    return unicodedata.normalize("NFC", name).strip().casefold()


def _lookalike_classes(class_dirs: list[Path]) -> list[str]:
    """Class folders that are different names on disk but read as one: case, NFC/NFD, surrounding spaces."""
    groups: dict[str, list[str]] = defaultdict(list)
    for folder in class_dirs:
        groups[class_key(folder.name)].append(folder.name)
    return [
        f"class folders {' and '.join(ascii(n) for n in names)} differ only by case, Unicode normalisation or "
        f"surrounding spaces; merge them into one folder or rename one"
        for names in groups.values()
        if len(names) > 1
    ]


def _unwrap(root: Path) -> Path:
    """Step into a single wrapping folder (``digits.zip`` holding ``digits/<class>/…``), never into a class."""
    children = list(_visible(root))
    while (
        len(children) == 1
        and children[0].is_dir()
        and not children[0].is_symlink()
        and (inner := list(_visible(children[0])))
        and all(c.is_dir() for c in inner)
        and children[0].name not in {"train", "test"}
    ):
        root = children[0]
        children = inner
    return root


def _visible(folder: Path) -> Iterator[Path]:
    """Folder entries, minus hidden files such as .DS_Store and junk such as __MACOSX/ and Thumbs.db."""
    return (p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and p.name not in JUNK_NAMES)


def _image_problems(
    entries: list[tuple[Path, str, str]], root: Path, limits: Limits, hashes: dict[Path, str]
) -> list[str]:
    """Every image's problem; ``hashes`` gets the content digest of each good one.

    The headers come first: a batch whose images together claim more than ``max_batch_pixels`` is refused
    before any is decoded.
    """
    problems, claimed, readable = [], 0, []
    for path, _, _ in entries:
        problem, pixels = _check_header(path, limits)
        if problem:
            problems.append(f"{path.relative_to(root)}: {problem}")
        else:
            readable.append(path)
            claimed += pixels
    if claimed > limits.max_batch_pixels:
        return [
            *problems,
            f"the batch's images hold {claimed} pixels (limit {limits.max_batch_pixels} per batch); "
            f"split it into smaller batches",
        ]
    for path in readable:
        data = path.read_bytes()
        try:
            decode(data, limits.max_pixels, limits.max_side)  # exactly as training and serving will
        except ImageError as exc:
            problems.append(f"{path.relative_to(root)}: {exc}")
        else:
            hashes[path] = hashlib.sha256(data).hexdigest()
    return problems


def _check_header(path: Path, limits: Limits) -> tuple[str | None, int]:
    """A problem visible without decoding (type, file size, format, claimed size), and the claimed pixels."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an allowed image type ({', '.join(sorted(IMAGE_SUFFIXES))})", 0
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        return f"{size} bytes is over the {limits.max_file_bytes}-byte limit", 0
    try:
        header = read_header(path)
        check_size(header, limits.max_pixels, limits.max_side)
    except ImageError as exc:
        return str(exc), 0
    return None, header.pixels


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
