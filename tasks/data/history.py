"""Data versions read back from git and DVC alone, without the ledger: what ``strata doctor`` checks the ledger
against, and rebuilds a lost ledger from.

Ingest commits each batch's ``.dvc`` file with the message ``strata: ingest <batch> for learner <learner>``
(``strata.tasks.data.ingest``); that commit, on a branch, and the md5 its ``.dvc`` file holds are the data
version. The files themselves are DVC objects, in the workspace's cache and on its remote.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from strata.tasks.data.versioning import DvcOut, VersioningError, git

INGEST_MESSAGE = re.compile(r"^strata: ingest (?P<batch>\S+) for learner (?P<learner>\S+)$")
BATCHES = "data/batches"  # strata.tasks.data.ingest.BATCHES, as git paths spell it
CACHE = Path(".dvc") / "cache"


@dataclass(frozen=True)
class IngestedVersion:
    """A batch as git holds it: its ingest commit and the ``.dvc`` file's md5 and hash name at that commit."""

    batch_id: str
    learner: str
    git_rev: str
    path: str  # relative to the workspace root, as the ledger stores it
    out: DvcOut


def ingested_versions(workspace: Path) -> list[IngestedVersion]:
    """Every ingest commit reachable from a branch, oldest first (the order the batches were ingested in)."""
    found: dict[str, IngestedVersion] = {}
    for line in git(workspace, "log", "--branches", "--reverse", "--format=%H %s").splitlines():
        rev, _, subject = line.partition(" ")
        match = INGEST_MESSAGE.match(subject)
        if match is None or match["batch"] in found:
            continue
        path = f"{BATCHES}/{match['batch']}"
        out = dvc_out_at(workspace, rev, path)
        if out is not None:
            found[match["batch"]] = IngestedVersion(match["batch"], match["learner"], rev, path, out)
    return list(found.values())


def dvc_out_at(workspace: Path, rev: str, path: str) -> DvcOut | None:
    """The md5 and hash name of ``path``'s ``.dvc`` file at commit ``rev``; None if that commit has no such file."""
    try:
        text = git(workspace, "show", f"{rev}:./{path}.dvc")
        out = yaml.safe_load(text)["outs"][0]
    except (VersioningError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return None
    return DvcOut(out["md5"], out.get("hash", "md5-dos2unix"))


def on_a_branch(workspace: Path, rev: str) -> bool:
    """True if commit ``rev`` exists and a branch holds it (a detached or rewritten commit can be lost)."""
    try:
        return bool(git(workspace, "branch", "--contains", rev, "--format=%(refname)"))
    except VersioningError:
        return False


def object_path(root: Path, out: DvcOut) -> Path:
    """Where a DVC cache or local remote at ``root`` keeps the object ``out`` (DVC 3 ``md5``, or DVC 2's)."""
    base = root / "files" / "md5" if out.hash_name == "md5" else root
    return base / out.md5[:2] / out.md5[2:]


def missing_objects(root: Path, out: DvcOut) -> int | None:
    """How many of a directory version's objects (its ``.dir`` listing and every file) ``root`` lacks; None when
    it lacks the listing itself, so the files cannot even be named."""
    listing = object_path(root, out)
    if not listing.is_file():
        return None
    entries = json.loads(listing.read_text())
    return sum(not object_path(root, DvcOut(e["md5"], out.hash_name)).is_file() for e in entries)


def class_counts(roots: list[Path], out: DvcOut) -> dict[str, dict[str, int]]:
    """The version's images per class and split (``train/<class>/…``, ``test/<class>/…``), as the ledger stores
    them, read from the first of ``roots`` (cache, remote) that holds its listing; empty if none does."""
    for root in roots:
        listing = object_path(root, out)
        if listing.is_file():
            counts: dict[str, Counter[str]] = {}
            for entry in json.loads(listing.read_text()):
                split, name, *_ = entry["relpath"].split("/")
                counts.setdefault(name, Counter())[split] += 1
            return {name: {"train": c["train"], "test": c["test"]} for name, c in sorted(counts.items())}
    return {}
