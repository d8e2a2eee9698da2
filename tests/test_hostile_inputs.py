"""Hostile and bad input: each is refused with an error that names the problem and leaves every store as it was.

The ingest-side and learner-side items compare ``store_snapshot`` before and after: ledger rows, git HEAD
and status, the workspace's data/ tree, the DVC cache and remote, the learners' saved states and the MLflow
store. They share one workspace that already holds data, so "as it was" is never merely "still empty". The
server's items are in tests/test_serving.py (test_a_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from sqlalchemy import select
from typer.testing import CliRunner

from strata.cli.app import app
from strata.flows.export import ExportParams
from strata.flows.learn import LearnParams, learn
from strata.models.backbones import BackboneError, build_backbone
from strata.models.engine import Engine
from strata.models.evaluation import evaluate
from strata.models.methods import StateError, create_method
from strata.models.streams import stream_from_batches
from strata.tasks.data.ingest import IngestError, ingest
from strata.tasks.data.materialise import materialise
from strata.tasks.data.validate import BatchRejectedError
from strata.tasks.data.versioning import git
from strata.tasks.ledger.increments import SucceededIncrement, configure_learner, finish_increment, start_increment
from strata.tasks.ledger.store import Base, Learner, LearnerNameError, find_data_version, ledger_session, make_engine
from strata.tasks.tracking import runs
from strata.tasks.workspace.settings import SETTINGS_FILE, load_settings
from strata.tasks.workspace.setup import init_workspace
from tests.test_ingest import image_tree, png_bytes


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of ~100 bytes whose header claims ``width``×``height`` pixels: the shape of a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def pickle_payload(marker: Path) -> bytes:
    """A pickle whose unpickling creates ``marker``: proof, if the file appears, that a loader ran pickled code."""

    class TouchOnUnpickle:
        def __reduce__(self):
            return (Path.touch, (marker,))

    return pickle.dumps({"vit.cls_token": TouchOnUnpickle()})


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file by its content digest, a folder or link by its kind."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): "link"
        if p.is_symlink()
        else "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def store_snapshot(settings) -> dict:
    """What every store of the workspace holds, comparable with ``==``.

    The ledger by its rows (a lease taken and given back rewrites the SQLite file, not the rows); git by HEAD
    and status; data/ (batches, .dvc files, staging leftovers), the DVC cache and remote, the learners' saved
    states and the MLflow store (its database and artifacts) by content.
    """
    engine = make_engine(settings.ledger_url)
    with engine.connect() as connection:
        ledger = {
            table.name: sorted(map(repr, connection.execute(select(table)))) for table in Base.metadata.sorted_tables
        }
    engine.dispose()
    mlflow_db = Path(settings.mlflow_tracking_uri.removeprefix("sqlite:///"))
    return {
        "ledger": ledger,
        "git": (git(settings.workspace, "rev-parse", "HEAD"), git(settings.workspace, "status", "--porcelain")),
        "data": _tree(settings.workspace / "data"),
        "dvc_cache": _tree(settings.workspace / ".dvc" / "cache"),
        "dvc_remote": _tree(Path(settings.dvc_remote)),
        "learner_states": _tree(settings.state_dir / "increments"),
        "mlflow": (
            _tree(Path(settings.mlflow_artifacts)),
            mlflow_db.is_file() and hashlib.sha256(mlflow_db.read_bytes()).hexdigest(),
        ),
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A workspace whose learner ``pets`` has one ingested batch (cat, dog); returns settings and that batch."""
    root = tmp_path_factory.mktemp("hostile")
    init_workspace(root / "ws")
    settings = load_settings(root / "ws")
    baseline = image_tree(root / "baseline", {"cat": 3, "dog": 3})
    return settings, baseline, ingest(settings, baseline, "pets")


# -- ingest: batches refused whole ---------------------------------------------------------------------------


def _corrupt(root: Path) -> Path:
    image_tree(root, {"cat": 3})
    damaged = bytearray((root / "cat" / "0.png").read_bytes())
    damaged[60:80] = b"\xff" * 20  # inside the IDAT chunk: the header still says PNG
    (root / "cat" / "0.png").write_bytes(bytes(damaged))
    return root


def _truncated(root: Path) -> Path:
    image_tree(root, {"cat": 3})
    whole = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "0.png").write_bytes(whole[: len(whole) // 2])
    return root


def _not_an_image(root: Path) -> Path:
    image_tree(root, {"cat": 3})
    (root / "cat" / "notes.jpg").write_text("meeting notes, not a picture")
    return root


def _bomb(width: int, height: int):
    def make(root: Path) -> Path:
        image_tree(root, {"cat": 3})
        (root / "cat" / "bomb.png").write_bytes(png_claiming(width, height))
        return root

    return make


def _empty(root: Path) -> Path:
    (root / "cat").mkdir(parents=True)
    return root


def _long_class_name(root: Path) -> Path:
    return image_tree(root, {"cat": 2, "x" * 200: 2})


def _zip(root: Path, extra: list[str], patch: tuple[bytes, bytes] = (b"", b"")) -> Path:
    """A zip of a valid class ``cat`` plus PNG members named ``extra``; ``patch`` rewrites raw bytes afterwards."""
    root.mkdir(parents=True)
    archive = root / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in [*(f"cat/{i}.png" for i in range(3)), *extra]:
            zf.writestr(name, png_bytes())
    old, new = patch
    archive.write_bytes(archive.read_bytes().replace(old, new))
    return archive


def _zip_symlink(root: Path) -> Path:
    archive = _zip(root, [])
    with zipfile.ZipFile(archive, "a") as zf:
        link = zipfile.ZipInfo("cat/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    return archive


def _tar(extra: tarfile.TarInfo):
    """A tar of a valid class ``cat`` plus the member ``extra`` (PAX, so a header may carry any path)."""

    def make(root: Path) -> Path:
        root.mkdir(parents=True)
        archive = root / "batch.tar"
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
            for info in [*(tarfile.TarInfo(f"cat/{i}.png") for i in range(3)), extra]:
                data = png_bytes() if info.isfile() else b""
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return archive

    return make


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", pax_path: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if pax_path:
        info.pax_headers = {"path": pax_path}
    return info


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_corrupt, r"cat/0.png: does not decode as an image \(SyntaxError: broken PNG file"),
        (_truncated, r"cat/0.png: does not decode as an image \(OSError: Truncated File Read"),
        (_not_an_image, r"cat/notes.jpg: does not decode as an image"),
        (_bomb(100_000, 100_000), r"cat/bomb.png: does not decode .*could be decompression bomb"),
        (_bomb(9_000, 9_000), r"cat/bomb.png: 9000x9000 pixels is over the size limit \(possible decompression bomb\)"),
        (_empty, r"the batch holds no images"),
        (lambda root: _zip(root, ["../0.png", "../1.png"]), r"archive member '../0.png' escapes its folder \(..\)"),
        (
            lambda root: _zip(root, ["cats/or/dogs/0.png", "cats/or/dogs/1.png"]),
            r"cats/or: nested folders inside a class are not allowed",
        ),
        (
            lambda root: _zip(root, ["catXevil/0.png", "catXevil/1.png"], (b"catXevil", b"cat\0evil")),
            r"archive member 'cat\\x00evil/0.png' contains a NUL byte",
        ),
        (
            _tar(_member("cat1/0.png", pax_path="cat\0evil/0.png")),
            r"archive member 'cat\\x00evil/0.png' contains a NUL",
        ),
        (_long_class_name, r"class name 'x{200}' is not safe as a folder name .*at most 64 characters"),
        (_tar(_member("/abs/cat/escape.png")), r"archive member '/abs/cat/escape.png' has an absolute path"),
        (lambda root: _zip(root, ["/etc/cat/evil.png"]), r"archive member '/etc/cat/evil.png' has an absolute path"),
        (_tar(_member("cat/../../escape.png")), r"archive member 'cat/../../escape.png' escapes its folder"),
        (_tar(_member("cat/link.png", tarfile.SYMTYPE, "/etc/passwd")), r"'cat/link.png' is a link or special file"),
        (_tar(_member("cat/hard.png", tarfile.LNKTYPE, "cat/0.png")), r"'cat/hard.png' is a link or special file"),
        (_zip_symlink, r"archive member 'cat/link.png' is a symbolic link"),
    ],
    ids=[
        "corrupt-image",
        "truncated-image",
        "non-image-with-image-extension",
        "decompression-bomb-pillow-limit",
        "decompression-bomb-strata-limit",
        "empty-batch",
        "class-name-dotdot",
        "class-name-slash",
        "class-name-nul-zip",
        "class-name-nul-tar",
        "class-name-too-long",
        "tar-absolute-path",
        "zip-absolute-path",
        "tar-dotdot-member",
        "tar-symlink",
        "tar-hardlink",
        "zip-symlink",
    ],
)
def test_bad_batch_is_refused_and_every_store_is_as_it_was(workspace, tmp_path, make, problem):
    settings = workspace[0]
    source = make(tmp_path / "src")
    before = store_snapshot(settings)
    with pytest.raises(BatchRejectedError, match=problem) as rejected:
        ingest(settings, source, "pets")
    assert f"batch {source} rejected, nothing was written" in str(rejected.value)
    assert store_snapshot(settings) == before


def test_re_ingested_batch_changes_nothing_and_another_learner_is_refused(workspace, tmp_path):
    settings, baseline, first = workspace
    archive = tmp_path / "same.tar.gz"  # the same content packed differently is the same batch
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(baseline, arcname="pets")
    before = store_snapshot(settings)
    for source in (baseline, archive):
        again = ingest(settings, source, "pets")
        assert not again.created and (again.batch_id, again.md5, again.git_rev) == (
            first.batch_id,
            first.md5,
            first.git_rev,
        )
    with pytest.raises(IngestError, match=rf"{first.batch_id} was already ingested for learner 'pets'"):
        ingest(settings, baseline, "other")
    assert store_snapshot(settings) == before


def test_batch_with_classes_the_learner_knows_is_refused_and_changes_nothing(workspace, tmp_path):
    settings = workspace[0]
    overlapping = image_tree(tmp_path / "next", {"dog": 3, "fox": 3})
    before = store_snapshot(settings)
    with pytest.raises(
        IngestError,
        match=r"learner 'pets' already knows classes \['dog'\]; a batch may only "
        r"bring new classes",
    ):
        ingest(settings, overlapping, "pets")
    assert store_snapshot(settings) == before


@pytest.mark.parametrize("name", ["../../outside", "a/b", "nul\x00name", "x" * 65, "-starts-with-a-dash", ""])
def test_unsafe_learner_name_is_refused_everywhere_it_could_name_a_folder(workspace, tmp_path, name):
    """A learner name becomes a folder (``.strata/increments/<learner>``), an MLflow model and a deployment:
    refused on ingest before anything is written, in the learn and export forms, and by the ledger itself."""
    settings = workspace[0]
    before = store_snapshot(settings)
    with pytest.raises(LearnerNameError, match="is not allowed: use 1-64 letters, digits"):
        ingest(settings, image_tree(tmp_path / "new", {"yak": 3}), name)
    assert store_snapshot(settings) == before
    for form in (LearnParams, ExportParams):
        with pytest.raises(ValidationError, match="String should match pattern"):
            form(learner=name)
    with pytest.raises(LearnerNameError):
        Learner(name=name)


def test_single_class_batch_is_ingested_and_learned_as_a_one_class_task(workspace, tmp_path):
    """The validator bounds images per class, not classes per batch, and a class-incremental task may bring one
    class: the batch becomes a data version of its own and the learner's next task has one new class."""
    settings, _, first = workspace
    single = ingest(settings, image_tree(tmp_path / "owls", {"owl": 4}), "pets")
    assert single.created and single.classes == {"owl": {"train": 3, "test": 1}}

    stream = stream_from_batches("pets", [materialise(settings, v.batch_id) for v in (first, single)])
    assert [t.class_names for t in stream.tasks] == [("cat", "dog"), ("owl",)]
    engine = Engine("cpu", seed=0, show_progress=False)
    method = create_method("simplecil", build_backbone("tiny"))
    for task in stream.tasks:
        method.learn(task, engine)
    assert method.task_sizes == [2, 1] and method.class_names == ["cat", "dog", "owl"]
    assert len(evaluate(method, stream.tasks, engine).accuracies) == 2
    with torch.inference_mode():
        assert method(torch.rand(2, 3, 32, 32)).shape == (2, 3)


# -- settings and the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ledger_url = [unclosed\n", "strata.toml is not valid TOML"),
        (
            'ledger_ur = "typo"\n',
            "invalid Strata settings (ledger_ur: Extra inputs are not permitted); check strata.toml",
        ),
        ("dvc_remote = 5\n", "invalid Strata settings (dvc_remote: Input should be a valid string); check strata.toml"),
    ],
    ids=["not-toml", "unknown-key", "wrong-type"],
)
def test_malformed_strata_toml_is_named_and_nothing_is_ingested(workspace, tmp_path, text, message):
    settings = workspace[0]
    batch = image_tree(tmp_path / "new", {"elk": 2, "gnu": 2})
    settings_file = settings.workspace / SETTINGS_FILE
    original = settings_file.read_text()
    settings_file.write_text(text)
    try:
        before = store_snapshot(settings)
        result = CliRunner().invoke(
            app, ["ingest", str(batch), "--learner", "pets", "--workspace", str(settings.workspace)]
        )
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert store_snapshot(settings) == before
    finally:
        settings_file.write_text(original)


def test_unknown_cli_option_is_refused_by_the_console_script_before_it_acts(workspace, tmp_path):
    """The installed ``strata`` script, in its own process: an option it does not know stops the whole command,
    so a batch that would otherwise be ingested is not."""
    settings = workspace[0]
    batch = image_tree(tmp_path / "new", {"elk": 2, "gnu": 2})
    before = store_snapshot(settings)
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("strata")),
            "ingest",
            str(batch),
            "--learner",
            "pets",
            "--workspace",
            str(settings.workspace),
            "--frobnicate",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "No such option: --frobnicate" in result.stderr and "strata ingest --help" in result.stderr
    assert store_snapshot(settings) == before


# -- learner: weights and saved states --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learned(workspace, tmp_path_factory):
    """Learner ``zoo`` after one increment, as the learn flow leaves it, with a second batch pending.

    The increment is made of the flow's own parts (a real SimpleCIL state, the ledger's increment record) rather
    than by a Prefect run, which would need a Prefect server; returns the state folder and a pristine copy.
    """
    settings = workspace[0]
    root = tmp_path_factory.mktemp("zoo")
    first = ingest(settings, image_tree(root / "first", {"ant": 3, "bee": 3}), "zoo")
    ingest(settings, image_tree(root / "second", {"cow": 3, "elk": 3}), "zoo")
    method = create_method("simplecil", build_backbone("tiny"))
    method.learn(
        stream_from_batches("zoo", [materialise(settings, first.batch_id)]).tasks[0],
        Engine("cpu", seed=0, show_progress=False),
    )
    state = method.save_state(settings.state_dir / "increments" / "zoo" / "task-000" / "state")
    runs.configure(settings)  # the MLflow store a learn leaves: a ledger recording increments without one is refused
    db = make_engine(settings.ledger_url)
    with ledger_session(db) as session:
        learner_id = configure_learner(session, "zoo", "simplecil", "tiny", {}).id
        version_id = find_data_version(session, first.batch_id).id
    increment = start_increment(db, learner_id, 0, version_id)
    done = SucceededIncrement(
        class_names=["ant", "bee"], first_class_id=0, checkpoint_uri=str(state), metrics={}, run_id="", model_version=""
    )
    finish_increment(db, increment, done)
    db.dispose()
    pristine = shutil.copytree(state, root / "pristine-state")
    return state, pristine


def _wrong_architecture(tmp_path: Path, state: Path) -> tuple[dict, bytes]:
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in build_backbone("tiny-wide").vit.state_dict().items()}, str(path))
    return {"weights": str(path)}, b""


def _pickled_weights(suffix: str):
    def make(tmp_path: Path, state: Path) -> tuple[dict, bytes]:
        payload = pickle_payload(tmp_path / "pwned")
        (tmp_path / f"evil{suffix}").write_bytes(payload)
        return {"weights": str(tmp_path / f"evil{suffix}")}, payload

    return make


def _state_of_another_method(tmp_path: Path, state: Path) -> tuple[dict, bytes]:
    shutil.rmtree(state)
    create_method("finetune", build_backbone("tiny")).save_state(state)
    return {}, b""


def _pickled_state(tmp_path: Path, state: Path) -> tuple[dict, bytes]:
    payload = pickle_payload(tmp_path / "pwned")
    (state / "state.safetensors").write_bytes(payload)
    return {}, payload


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            _wrong_architecture,
            BackboneError,
            r"weights file .*wide.safetensors does not fit backbone 'tiny': .*shape mismatch .*; "
            r"pass weights saved from a 'tiny' model",
        ),
        (
            _pickled_weights(".pth"),
            BackboneError,
            r"cannot read weights file .*evil.pth: it holds pickled Python objects besides tensors, which Strata never "
            r"unpickles .*save_file\(model.state_dict\(\), 'vit.safetensors'\)",
        ),
        (
            _pickled_weights(".safetensors"),
            BackboneError,
            r"cannot read weights file .*evil.safetensors: SafetensorError: .*; it is damaged or not a .safetensors "
            r"checkpoint. Save the model's plain state dict",
        ),
        (
            _state_of_another_method,
            StateError,
            r"cannot load the state in .*task-000/state: state was saved by method 'finetune', not 'simplecil'; "
            r"build a 'finetune' method to load it",
        ),
        (
            _pickled_state,
            StateError,
            r"task-000/state/state.safetensors is not a safetensors file .*: it is damaged or was not written by "
            r"save_state; restore the state folder",
        ),
    ],
    ids=[
        "wrong-architecture-weights",
        "pickle-as-pth-weights",
        "pickle-as-safetensors-weights",
        "checkpoint-from-another-method",
        "pickle-as-state-safetensors",
    ],
)
def test_learn_refuses_hostile_weights_and_states_and_writes_nothing(
    workspace, learned, tmp_path, make, error, message
):
    """Through the learn flow's body (``learn.fn``: the refusals come before its first Prefect task)."""
    settings = workspace[0]
    state, pristine = learned
    try:
        params, payload = make(tmp_path, state)
        before = store_snapshot(settings)
        with pytest.raises(error, match=message):
            learn.fn(LearnParams(learner="zoo", workspace=str(settings.workspace), show_progress=False, **params))
        assert store_snapshot(settings) == before
    finally:
        shutil.rmtree(state)
        shutil.copytree(pristine, state)
    if payload:
        assert not (tmp_path / "pwned").exists()
        pickle.loads(payload)  # the payload is live: unpickled, it does create the marker
        assert (tmp_path / "pwned").exists()
