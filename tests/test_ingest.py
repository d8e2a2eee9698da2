"""Ingestion into a real git + DVC workspace with a local remote, and reading versions back through DVC."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from dvc.repo import Repo
from PIL import Image

from strata.models.streams import stream_from_batches
from strata.tasks.data import ingest as ingest_module
from strata.tasks.data.ingest import IngestError, ingest
from strata.tasks.data.materialise import DataVersionError, materialise
from strata.tasks.data.validate import BatchRejectedError
from strata.tasks.data.versioning import directory_md5, git
from strata.tasks.ledger.store import ledger_session, list_data_versions, make_engine
from strata.tasks.workspace.settings import load_settings
from strata.tasks.workspace.setup import init_workspace

_counter = iter(range(10**6))


def png_bytes(side: int = 8) -> bytes:
    """A small PNG whose pixels differ from every other one this module makes."""
    rng = np.random.default_rng(next(_counter))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_tree(root: Path, classes: dict[str, int]) -> Path:
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.png").write_bytes(png_bytes())
    return root


def make_workspace(root: Path):
    init_workspace(root)
    return load_settings(root)


@pytest.fixture()
def settings(tmp_path):
    return make_workspace(tmp_path / "ws")


def versions(settings) -> list:
    engine = make_engine(settings.ledger_url)
    with ledger_session(engine) as session:
        rows = [(v.batch_id, v.learner.name, v.md5) for v in list_data_versions(session)]
    engine.dispose()
    return rows


def test_ingest_versions_pushes_and_reads_back_from_the_remote(settings, tmp_path):
    source = image_tree(tmp_path / "batch", {"cat": 4, "dog": 5})
    result = ingest(settings, source, "pets", test_fraction=0.25, seed=0)

    assert result.created and result.batch_id.startswith("batch-")
    assert result.classes == {"cat": {"train": 3, "test": 1}, "dog": {"train": 4, "test": 1}}
    assert versions(settings) == [(result.batch_id, "pets", result.md5)]
    assert git(settings.workspace, "log", "-1", "--format=%H") == result.git_rev
    assert git(settings.workspace, "status", "--porcelain") == ""
    with Repo(str(settings.workspace)) as repo:
        assert repo.status() == {}
        assert repo.status(cloud=True) == {}  # pushed to the local remote

    batch = settings.workspace / "data" / "batches" / result.batch_id
    shutil.rmtree(settings.workspace / ".dvc" / "cache")
    shutil.rmtree(batch)
    dataset = materialise(settings, result.batch_id)  # pulled back from the remote
    assert directory_md5(batch) == result.md5
    assert dataset.class_names == ("cat", "dog")
    assert (len(dataset.train), len(dataset.test)) == (7, 2)
    stream = stream_from_batches("pets", [dataset])
    assert stream.tasks[0].class_names == ("cat", "dog")

    (batch / "train" / "cat" / next(iter(os.listdir(batch / "train" / "cat")))).write_bytes(png_bytes())
    with Repo(str(settings.workspace)) as repo:
        assert repo.status() != {}  # DVC sees the tampering; materialise restores the ingested files
    materialise(settings, result.batch_id)
    assert directory_md5(batch) == result.md5


def test_materialise_pulls_only_files_that_differ_and_refuses_what_a_pull_leaves_wrong(settings, tmp_path, monkeypatch):
    result = ingest(settings, image_tree(tmp_path / "batch", {"cat": 3, "dog": 3}), "pets")
    batch = settings.workspace / "data" / "batches" / result.batch_id
    pulls = []
    monkeypatch.setattr("strata.tasks.data.materialise.dvc_pull", lambda workspace, path: pulls.append(path))
    assert materialise(settings, result.batch_id).class_names == ("cat", "dog")
    assert pulls == []  # the files on disk are the ingested version: nothing to pull

    stray = batch / "train" / "cat" / "stray.png"
    stray.write_bytes(png_bytes())
    with pytest.raises(DataVersionError, match="the data changed after ingestion"):
        materialise(settings, result.batch_id)  # a pull that changed nothing
    assert pulls == [batch]
    monkeypatch.undo()
    materialise(settings, result.batch_id)  # the real pull checks the version out exactly
    assert not stray.exists() and directory_md5(batch) == result.md5


def test_identical_batch_is_a_no_op_and_known_classes_are_refused(settings, tmp_path):
    source = image_tree(tmp_path / "wrapper" / "animals", {"cat": 3, "dog": 3})
    archive = tmp_path / "animals.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="animals")
    first = ingest(settings, archive, "pets")
    head = git(settings.workspace, "rev-parse", "HEAD")

    again = ingest(settings, source, "pets")  # same content as a folder: same batch id
    assert not again.created and (again.batch_id, again.md5) == (first.batch_id, first.md5)
    assert git(settings.workspace, "rev-parse", "HEAD") == head

    overlapping = image_tree(tmp_path / "next", {"dog": 3, "fox": 3})
    with pytest.raises(IngestError, match=r"already knows classes \['dog'\]"):
        ingest(settings, overlapping, "pets")
    assert ingest(settings, overlapping, "other-learner").created  # another learner may learn dogs


def test_crash_before_the_ledger_row_leaves_no_version_and_the_next_ingest_recovers(settings, tmp_path, monkeypatch):
    source = image_tree(tmp_path / "batch", {"cat": 3, "dog": 3})

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    for step in ("_record", "dvc_push", "dvc_add"):
        with monkeypatch.context() as patch:
            patch.setattr(ingest_module, step, crash)
            with pytest.raises(RuntimeError, match="killed"):
                ingest(settings, source, "pets")
        assert versions(settings) == []

    result = ingest(settings, source, "pets")
    assert result.created and versions(settings) == [(result.batch_id, "pets", result.md5)]
    assert git(settings.workspace, "status", "--porcelain") == ""
    ingest_commits = git(settings.workspace, "log", "--format=%s", "--grep", "strata: ingest").splitlines()
    assert len(ingest_commits) == 1
    with Repo(str(settings.workspace)) as repo:
        assert repo.status() == {} and repo.status(cloud=True) == {}


def test_event_is_sent_only_to_a_configured_prefect_api(settings, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    sent = []
    monkeypatch.setattr("prefect.events.emit_event", lambda **kwargs: sent.append(kwargs))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = ingest(settings, image_tree(tmp_path / "a", {"cat": 2, "dog": 2}), "pets")
    assert result.created and sent == []  # no server: ingest succeeds without starting one
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        result = ingest(settings, image_tree(tmp_path / "b", {"fox": 2, "owl": 2}), "pets")
    assert sent[0]["event"] == "strata.batch.ingested"
    assert sent[0]["payload"] == {
        "learner": "pets",
        "batch_id": result.batch_id,
        "md5": result.md5,
        "classes": ["fox", "owl"],
    }


@pytest.fixture(scope="module")
def shared_workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("rejections") / "ws")


def _corrupt(root: Path) -> None:
    image_tree(root, {"cat": 3})
    (root / "cat" / "0.png").write_bytes(png_bytes()[:40])


def _not_an_image(root: Path) -> None:
    image_tree(root, {"cat": 3})
    (root / "cat" / "notes.jpg").write_text("not a picture")


def _empty(root: Path) -> None:
    (root / "cat").mkdir(parents=True)


def _bad_class(root: Path) -> None:
    image_tree(root, {"cat": 2, "rm -rf;*": 2})


def _symlink(root: Path) -> None:
    image_tree(root, {"cat": 3})
    (root / "cat" / "link.png").symlink_to(root / "cat" / "0.png")


def _duplicates(root: Path) -> None:
    image_tree(root, {"cat": 3, "dog": 3})
    shutil.copyfile(root / "cat" / "0.png", root / "dog" / "copy.png")


def _too_few(root: Path) -> None:
    image_tree(root, {"cat": 3, "dog": 1})


def _bomb(root: Path) -> None:
    image_tree(root, {"cat": 3})
    Image.new("L", (20_001, 1)).save(root / "cat" / "wide.png")


def _tar_with(member: str):
    def make(root: Path) -> Path:
        image_tree(root / "tree", {"cat": 3})
        archive = root / "batch.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root / "tree" / "cat", arcname="cat")
            info = tarfile.TarInfo(member)
            data = png_bytes()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return archive

    return make


def _zip_with_absolute_path(root: Path) -> Path:
    root.mkdir(parents=True)
    archive = root / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(3):
            zf.writestr(f"cat/{i}.png", png_bytes())
        zf.writestr("/etc/cat/evil.png", png_bytes())
    return archive


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_corrupt, "does not decode as an image"),
        (_not_an_image, "notes.jpg: does not decode"),
        (_empty, "holds no images"),
        (_bad_class, "class name 'rm -rf;\\*' is not safe"),
        (_symlink, "link.png is a symbolic link"),
        (_duplicates, "identical images: cat/0.png, dog/copy.png"),
        (_too_few, "class 'dog' has 1 images"),
        (_bomb, "20001x1 pixels is over the size limit"),
        (_tar_with("../escape.png"), "escapes its folder"),
        (_tar_with("/abs/escape.png"), "absolute path"),
        (_zip_with_absolute_path, "absolute path"),
    ],
    ids=[
        "corrupt",
        "not-an-image",
        "empty",
        "bad-class-name",
        "symlink",
        "duplicates",
        "too-few",
        "bomb",
        "tar-dotdot",
        "tar-absolute",
        "zip-absolute",
    ],
)
def test_bad_batches_are_rejected_whole_with_nothing_written(shared_workspace, tmp_path, make, problem):
    settings = shared_workspace
    head = git(settings.workspace, "rev-parse", "HEAD")
    source = make(tmp_path / "src") or tmp_path / "src"
    with pytest.raises(BatchRejectedError, match=problem) as rejected:
        ingest(settings, source, "pets")
    assert "nothing was written" in str(rejected.value)
    assert not (settings.workspace / "data").exists()
    assert git(settings.workspace, "rev-parse", "HEAD") == head
    assert git(settings.workspace, "status", "--porcelain") == ""
    assert versions(settings) == []


def test_a_rejection_lists_every_problem(shared_workspace, tmp_path):
    source = image_tree(tmp_path / "src", {"cat": 3, "dog": 1})
    (source / "cat" / "0.png").write_bytes(b"garbage")
    with pytest.raises(BatchRejectedError) as rejected:
        ingest(shared_workspace, source, "pets")
    assert len(rejected.value.problems) == 2
