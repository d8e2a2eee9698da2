"""A full disk and a read-only workspace: ``strata ingest`` says so in one line and leaves the stores consistent.

The workspace (git, DVC cache and its default remote ``.strata/dvc-remote``, the ledger) lives on a
small tmpfs mounted in a private user and mount namespace (``unshare``), so the kernel's own ENOSPC and
EROFS are what Strata meets. The scenario runs in a child process inside that namespace and reports what
it saw; the assertions are made here.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.test_ingest import image_tree, png_bytes

ROOT = Path(__file__).resolve().parent.parent
TMPFS_SIZE = "16m"
LEFT_FOR_COPY = 1024 * 1024  # the large batch's copy takes 640 KB of it, DVC's cache copy would take 640 more


def namespace_command(*command: str) -> list[str]:
    return ["unshare", "--user", "--map-root-user", "--mount", *command]


def namespaces_usable(probe: Path) -> str | None:
    """None when a tmpfs can be mounted and remounted read-only in a private namespace here; else why not."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe.mkdir()
    script = f"mount -t tmpfs -o size=1m tmpfs {probe} && mount -o remount,ro {probe}"
    result = subprocess.run(namespace_command("sh", "-c", script), capture_output=True, text=True)
    if result.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace here: {result.stderr.strip() or result.returncode}"
    return None


def fill(path: Path, leave: int = 0) -> None:
    """Write ``path`` until the file system is full, then give ``leave`` bytes back."""
    chunk = b"\0" * 65536
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, chunk)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        os.ftruncate(descriptor, max(os.fstat(descriptor).st_size - leave, 0))
    finally:
        os.close(descriptor)


def large_batch(root: Path, per_class: int) -> Path:
    """Two classes of 64 px images (12.4 KB: four 4 KB pages of tmpfs each)."""
    for name in ("fox", "owl"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(png_bytes(64))
    return root


def scenario(mount: Path, batches: list[Path]) -> dict:
    """Run inside the namespace: ingest, fail on a full then a read-only disk, recover; report each step."""
    from dvc.repo import Repo
    from typer.testing import CliRunner

    from strata.cli.app import app
    from strata.tasks.data.versioning import git
    from strata.tasks.ledger.store import ledger_session, list_data_versions, make_engine
    from strata.tasks.workspace.settings import load_settings
    from strata.tasks.workspace.setup import init_workspace

    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount)], check=True)
    workspace = mount / "ws"
    init_workspace(workspace)
    settings = load_settings(workspace)
    runner = CliRunner()

    def ingest(batch: Path) -> dict:
        """``strata ingest``; ``stray`` is what reached the process's own stdout and stderr around the CLI's
        output (DVC and Prefect log through handlers bound to them at import)."""
        with tempfile.TemporaryFile() as sink:
            saved = [os.dup(1), os.dup(2)]
            for descriptor in (1, 2):
                os.dup2(sink.fileno(), descriptor)
            try:
                result = runner.invoke(app, ["ingest", str(batch), "--learner", "pets", "--workspace", str(workspace)])
            finally:
                sys.__stdout__.flush()
                sys.__stderr__.flush()
                for descriptor, original in zip((1, 2), saved, strict=True):
                    os.dup2(original, descriptor)
                    os.close(original)
            sink.seek(0)
            stray = sink.read().decode(errors="replace")
        return {
            "exit_code": result.exit_code,
            "output": result.output,
            "stray": stray,
            "exception": None
            if result.exception is None or isinstance(result.exception, SystemExit)
            else f"{type(result.exception).__name__}: {result.exception}",
        }

    def stores() -> dict:
        engine = make_engine(settings.ledger_url)
        with ledger_session(engine) as session:
            versions = [v.batch_id for v in list_data_versions(session)]
        engine.dispose()
        with Repo(str(workspace)) as repo:
            dvc_status, remote_status = repo.status(), repo.status(cloud=True)
        return {
            "versions": versions,
            "git_status": git(workspace, "status", "--porcelain", "--untracked-files=all"),
            "dvc_status": dvc_status,
            "remote_status": remote_status,
            "head": git(workspace, "rev-parse", "HEAD"),
            "batches": sorted(os.listdir(workspace / "data" / "batches")),
        }

    report = {"first": ingest(batches[0])}
    report["before_full"] = stores()
    filler = mount / "filler"
    fill(filler)
    report["full"] = ingest(batches[1])  # fails copying the batch into the workspace
    filler.unlink()
    report["after_full"] = stores()
    fill(filler, leave=LEFT_FOR_COPY)
    report["nearly_full"] = ingest(batches[1])  # the copy fits, DVC's cache copy does not
    filler.unlink()
    report["after_nearly_full"] = stores()
    report["freed"] = ingest(batches[1])
    report["before_read_only"] = stores()
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    report["read_only"] = ingest(batches[2])
    subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
    report["after_read_only"] = stores()
    report["writable"] = ingest(batches[2])
    report["end"] = stores()
    return report


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The scenario's report, run once in a private namespace (skipped where namespaces or mounts are refused)."""
    root = tmp_path_factory.mktemp("disk-faults")
    reason = namespaces_usable(root / "probe")
    if reason:
        pytest.skip(reason)
    batches = [
        image_tree(root / "incoming" / "one", {"cat": 3, "dog": 3}),
        large_batch(root / "incoming" / "two", 20),
        image_tree(root / "incoming" / "three", {"eel": 3, "yak": 3}),
    ]
    mount = root / "mnt"
    mount.mkdir()
    code = (
        f"import json, sys; from tests.test_disk_faults import scenario; from pathlib import Path; "
        f"json.dump(scenario(Path({str(mount)!r}), [Path(p) for p in {[str(b) for b in batches]!r}]), "
        f"sys.stdout)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400"}  # COLUMNS: rich must not wrap the one line
    result = subprocess.run(
        namespace_command(sys.executable, "-c", code), capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def one_error_line(step: dict) -> str:
    """The command's output, checked to be exit code 2 and a single ``error:`` line: no traceback, no log."""
    assert step["exception"] is None, step
    assert step["exit_code"] == 2, step
    lines = step["output"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), step["output"]
    assert step["stray"] == "", step["stray"]
    return lines[0]


def assert_unchanged(before: dict, after: dict) -> None:
    """The failed ingest left every store as it was, and consistent: nothing staged, nothing to commit or push."""
    assert after == before
    assert after["git_status"] == "" and after["dvc_status"] == {} and after["remote_status"] == {}
    assert not [name for name in after["batches"] if name.startswith(".") and name != ".gitignore"]


def test_a_full_disk_fails_ingest_clearly_and_changes_nothing_until_space_is_freed(report):
    assert report["first"]["exit_code"] == 0, report["first"]
    assert len(report["before_full"]["versions"]) == 1
    for step, where in (("full", "/ws/data/batches/.batch-"), ("nearly_full", "/ws/.dvc/cache/")):
        line = one_error_line(report[step])
        assert "no space left on device" in line.lower() and "free space" in line.lower(), line
        assert where in line, line  # the path it could not write: the staging copy, then DVC's cache
        assert_unchanged(report["before_full"], report[f"after_{step}"])

    assert report["freed"]["exit_code"] == 0, report["freed"]
    assert len(report["before_read_only"]["versions"]) == 2


def test_a_read_only_workspace_fails_ingest_clearly_and_changes_nothing_until_writable(report):
    line = one_error_line(report["read_only"])
    assert "read-only file system" in line.lower() and "read-write" in line.lower()
    assert_unchanged(report["before_read_only"], report["after_read_only"])

    assert report["writable"]["exit_code"] == 0, report["writable"]
    assert len(report["end"]["versions"]) == 3
    assert report["end"]["git_status"] == "" and report["end"]["dvc_status"] == {}
