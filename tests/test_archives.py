"""Archives and names: extraction counted as it writes, junk skipped, Windows and compressed archives read,
names too long or ambiguous refused with the member's name, and every refusal leaves every store as it was."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
import unicodedata
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from strata.cli.app import app
from strata.tasks.data import validate
from strata.tasks.data.ingest import ingest
from strata.tasks.data.materialise import materialise
from strata.tasks.data.validate import BatchRejectedError, Limits
from strata.tasks.doctor.checks import diagnose
from strata.tasks.workspace.settings import load_settings
from strata.tasks.workspace.setup import init_workspace
from tests.test_hostile_inputs import store_snapshot
from tests.test_ingest import image_tree, png_bytes


def make_zip(path: Path, members: dict[str, bytes | None]) -> Path:
    """A zip of ``members`` (None: a folder entry), names written exactly as given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), b"" if data is None else data)
    return path


def make_tar(path: Path, members: dict[str, bytes | None], mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
            info.size = 0 if data is None else len(data)
            archive.addfile(info, io.BytesIO(data or b""))
    return path


def pngs(*folders: str, count: int = 2) -> dict[str, bytes | None]:
    return {f"{folder}/{i}.png": png_bytes() for folder in folders for i in range(count)}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A workspace whose learner ``pets`` already holds one batch, so "as it was" is never merely "empty"."""
    root = tmp_path_factory.mktemp("archives")
    init_workspace(root / "ws")
    settings = load_settings(root / "ws")
    ingest(settings, image_tree(root / "baseline", {"cat": 2, "dog": 2}), "pets")
    return settings


def refused(settings, source: Path) -> str:
    """Ingest ``source`` through the CLI; it must exit 2 with one error line and change no store."""
    before = store_snapshot(settings)
    result = CliRunner().invoke(
        app, ["ingest", str(source), "--learner", "pets", "--workspace", str(settings.workspace)]
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: batch {source} rejected, nothing was written"), result.output
    assert store_snapshot(settings) == before
    assert diagnose(settings) == []
    return result.output


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """About 1 MB of zip whose one member unpacks to 1 GiB of zeros, written in chunks (never 1 GiB in memory)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("cat/0.png", "w", force_zip64=True) as member:
            zeros = bytes(2**20)
            for _ in range(1024):
                member.write(zeros)
    return path


def test_an_archive_bomb_writes_nothing_to_disk(workspace, bomb, tmp_path, monkeypatch):
    """Before: 1,073,741,824 bytes landed in the temp dir before the batch was refused. Now the header is checked
    first, and the temp dir is sampled while ingest runs: it never holds a byte of the bomb."""
    assert bomb.stat().st_size < 2 * 2**20
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    peak, running = 0, True

    def sample() -> None:
        nonlocal peak
        while running:
            sizes = (os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(tmp_path) for f in fs)
            peak = max(peak, sum(sizes, 0))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        output = refused(workspace, bomb)
    finally:
        running = False
        sampler.join()
    assert "archive member 'cat/0.png' unpacks to 1073741824 bytes (limit 52428800 per file)" in output
    assert peak == 0 and list(tmp_path.iterdir()) == []


def test_extraction_stops_before_the_chunk_that_crosses_a_limit_whatever_the_header_said(tmp_path):
    """The counted write, for a member whose stream is longer than its header declared: at most the limit is
    ever on disk, and the partial file is removed."""
    target = tmp_path / "out" / "cat" / "big.png"
    seen: list[int] = []

    class Stream(io.BytesIO):
        def read(self, size: int = -1) -> bytes:
            seen.append(target.stat().st_size if target.exists() else 0)
            return super().read(size)

    extraction = validate._Extraction(tmp_path / "batch.zip", tmp_path / "out", Limits(max_file_bytes=3 * 2**20))
    with pytest.raises(BatchRejectedError, match=r"'cat/big.png' unpacks to more than 3145728 bytes"):
        extraction.file("cat/big.png", Stream(bytes(10 * 2**20)))
    assert max(seen) <= 3 * 2**20 and not target.exists()

    total = validate._Extraction(tmp_path / "batch.zip", tmp_path / "out", Limits(max_archive_bytes=2**20 + 10))
    total.file("cat/a.png", io.BytesIO(bytes(2**20)))
    with pytest.raises(BatchRejectedError, match=r"unpacks to more than 1048586 bytes \(stopped at member 'cat/b"):
        total.file("cat/b.png", io.BytesIO(bytes(2**20)))
    assert not (tmp_path / "out" / "cat" / "b.png").exists()


def test_finder_and_windows_junk_is_skipped(workspace, tmp_path):
    members = {
        **pngs("owl", "yak"),
        "__MACOSX/owl/._0.png": b"\0\5\26\7 AppleDouble",
        "owl/._1.png": b"\0\5\26\7 AppleDouble",
        "owl/.DS_Store": b"\0\0\0\1Bud1",
        "yak/Thumbs.db": b"\xd0\xcf\x11\xe0",
        "desktop.ini": b"[.ShellClassInfo]",
    }
    result = ingest(workspace, make_zip(tmp_path / "mac.zip", members), "junk")
    assert result.created and sorted(result.classes) == ["owl", "yak"]
    folder = workspace.workspace / "data" / "batches" / result.batch_id
    assert sorted(p.suffix for p in folder.rglob("*") if p.is_file()) == [".png"] * 4
    assert diagnose(workspace) == []


def test_backslash_member_names_are_folders(workspace, tmp_path):
    """Windows tools (PowerShell's Compress-Archive before 7.x) write ``class\\\\file``: read as a folder."""
    members = {name.replace("/", "\\"): data for name, data in pngs("elk", "gnu").items()}
    result = ingest(workspace, make_zip(tmp_path / "windows.zip", members), "windows")
    assert result.created and result.classes == {"elk": {"train": 1, "test": 1}, "gnu": {"train": 1, "test": 1}}
    assert diagnose(workspace) == []


@pytest.mark.parametrize("suffix", [".tar.xz", ".txz", ".tar.bz2", ".tbz2"])
def test_xz_and_bz2_tars_are_ingested(workspace, tmp_path, suffix):
    members = pngs("ant", "bee")
    mode = "w:xz" if "x" in suffix else "w:bz2"
    result = ingest(workspace, make_tar(tmp_path / f"batch{suffix}", members, mode), f"tar{suffix.replace('.', '-')}")
    assert result.created and sorted(result.classes) == ["ant", "bee"]
    assert diagnose(workspace) == []


def test_unicode_class_names_are_learned_by_their_nfc_name(workspace, tmp_path):
    """macOS writes names decomposed (NFD); the class is its composed (NFC) name, so it matches what people type."""
    decomposed = unicodedata.normalize("NFD", "café")
    result = ingest(workspace, make_zip(tmp_path / "cafe.zip", pngs(decomposed, "thé")), "unicode")
    assert sorted(result.classes) == ["café", "thé"]
    assert materialise(workspace, result.batch_id).class_names == ("café", "thé")
    assert diagnose(workspace) == []


LONG = "x" * 300
DEEP = "/".join(["d" * 200] * 21) + "/0.png"  # every part under 255 bytes, the whole over 4096


@pytest.mark.parametrize(
    ("members", "problem"),
    [
        (
            {**pngs("cat"), f"cat/{LONG}.png": png_bytes()},
            f"archive member 'cat/{'x' * 96}'… (308 bytes) has a name over 255",
        ),
        ({**pngs("cat"), f"cat/{DEEP}": png_bytes()}, "has a path over 4096 bytes; shorten it"),
        (pngs("Cat", "cat"), "class folders 'Cat' and 'cat' differ only by case"),
        (
            pngs(unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")),
            r"class folders 'cafe\u0301' and 'caf\xe9' differ only by case, Unicode normalisation or surrounding",
        ),
        (pngs("dog", "dog "), "class folders 'dog' and 'dog ' differ only by case"),
        ({**pngs("cat"), "dog/": None}, "class folder dog holds no images; add some or remove it"),
        ({**pngs("cat"), "cat": png_bytes()}, "archive member 'cat' is both a file and a folder"),
        ({**pngs("cat"), "cat\\0.png": png_bytes()}, "archive member 'cat/0.png' appears 2 times"),
    ],
    ids=[
        "name-over-255-bytes",
        "path-over-4096-bytes",
        "case",
        "nfc-nfd",
        "whitespace",
        "empty-class",
        "file-and-folder",
        "duplicate-member",
    ],
)
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_bad_names_are_refused_with_the_member_and_nothing_is_written(workspace, tmp_path, members, problem, kind):
    source = tmp_path / f"batch.{kind}"
    make_zip(source, members) if kind == "zip" else make_tar(source, members, "w:gz")
    output = refused(workspace, source)
    assert problem in output, output


def test_an_empty_class_folder_in_a_folder_batch_is_named(workspace, tmp_path):
    source = image_tree(tmp_path / "batch", {"cat": 2})
    (source / "dog").mkdir()
    assert "class folder dog holds no images" in refused(workspace, source)


def test_a_class_that_only_looks_new_to_the_learner_is_refused(workspace, tmp_path):
    """The learner knows ``cat`` (the fixture's batch): a later batch's ``Cat `` is the same class to a person."""
    source = make_zip(tmp_path / "later.zip", pngs("Cat ", "fox"))
    before = store_snapshot(workspace)
    result = CliRunner().invoke(
        app, ["ingest", str(source), "--learner", "pets", "--workspace", str(workspace.workspace)]
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith(
        "error: the batch's class 'Cat ' differs from class 'cat', which learner 'pets' already knows, only by case"
    ), result.output
    assert store_snapshot(workspace) == before
    assert diagnose(workspace) == []
