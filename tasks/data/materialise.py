"""Materialise a data version for training: through DVC, checked against the ledger's md5.

Training never trusts ``data/batches`` blindly: it recomputes the folder's md5 and, unless the files on
disk are exactly the ingested version, pulls the version (from the remote when the local cache lacks it)
and checks again, refusing data that still differ from what was ingested. Files that already match are
used as they are: a pull would only re-check what the md5 just proved.
"""

from __future__ import annotations

from pathlib import Path

from strata.models.errors import UserError
from strata.models.streams import LabelledDataset, LabelledImages
from strata.tasks.data.versioning import directory_md5, dvc_lock, dvc_pull, read_dvc_out
from strata.tasks.ledger.migrate import ledger
from strata.tasks.ledger.store import find_data_version
from strata.tasks.workspace.settings import StrataSettings


class DataVersionError(UserError, ValueError):
    """A data version is unknown or its files do not match the ledger; the message says which."""


def materialise(settings: StrataSettings, batch_id: str) -> LabelledDataset:
    """The version's images on disk, verified, as a LabelledDataset (classes in sorted name order)."""
    with ledger(settings.ledger_url) as session:
        version = find_data_version(session, batch_id)
        if version is None:
            raise DataVersionError(f"no data version {batch_id!r} in the ledger; see `strata data list`")
        path, md5, classes = settings.workspace / version.path, version.md5, sorted(version.classes)
    recorded = read_dvc_out(path).md5
    if recorded != md5:
        raise DataVersionError(
            f"{path}.dvc says md5 {recorded} but the ledger recorded {md5} for {batch_id}: "
            f"check out the git revision that ingested it"
        )
    with dvc_lock(settings.workspace):
        if not (path.is_dir() and directory_md5(path) == md5):
            dvc_pull(settings.workspace, path)
            actual = directory_md5(path)
            if actual != md5:
                raise DataVersionError(f"{path} has md5 {actual}, expected {md5}: the data changed after ingestion")
    return LabelledDataset(
        batch_id, tuple(classes), _split(path / "train", classes), _split(path / "test", classes), content_key=md5
    )


def _split(folder: Path, classes: list[str]) -> LabelledImages:
    images: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.is_file())
        images.extend(str(p) for p in files)
        labels.extend([label] * len(files))
    return LabelledImages(images, labels)
