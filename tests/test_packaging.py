"""Strata as a package among others: one ``strata`` namespace, imports only downward, a wheel that stands alone,
and a logged model that loads beside a user's own ``models/`` and ``tasks/`` packages."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"cli": 3, "flows": 2, "tasks": 1, "models": 0}  # a module may import only from its own layer or below
PRODUCT = ("cli", "flows", "tasks", "models", "migrations")
# A user's project that shadows every generic name Strata used to import under (ML repos ship their own models/).
SHADOWS = ("models", "tasks", "flows", "cli")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _product_files() -> list[Path]:
    return [path for folder in PRODUCT for path in sorted((ROOT / folder).rglob("*.py"))]


def test_every_module_imports_strata_by_its_namespace_and_only_downward():
    upward, bare = [], []
    for path in _product_files():
        layer = path.relative_to(ROOT).parts[0]
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] in LAYERS:
                bare.append(f"{path.relative_to(ROOT)}: import {name}")
            if parts[0] == "strata" and len(parts) > 1 and parts[1] in LAYERS and layer in LAYERS:
                if LAYERS[parts[1]] > LAYERS[layer]:
                    upward.append(f"{path.relative_to(ROOT)}: import {name}")
    assert not bare, "imports outside the strata namespace:\n" + "\n".join(bare)
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_the_import_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("from strata.flows.learn import learn\nimport models.engine\n")
    assert _imports(module) == ["strata.flows.learn", "models.engine"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):  # built from a copy: setuptools writes build/ beside the sources
        shutil.copy(ROOT / name, source / name)
    for name in PRODUCT:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("strata_cil-*.whl")
    return path


def test_the_wheel_holds_only_the_strata_namespace_with_its_migrations(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"strata"}
    for expected in (
        "strata/flows/learn.py",
        "strata/cli/app.py",
        "strata/tasks/ledger/migrate.py",
        "strata/models/engine.py",
        "strata/migrations/env.py",
    ):
        assert expected in names
    assert any(name.startswith("strata/migrations/versions/") and name.endswith("_promotions.py") for name in names)
    assert not any(name.startswith("strata/__init__") for name in names)  # an implicit namespace package


def _user_project(directory: Path) -> Path:
    """A folder with packages named like Strata's old top-level ones, each failing loudly if imported."""
    for name in SHADOWS:
        (directory / name).mkdir(parents=True)
        (directory / name / "__init__.py").write_text(f"raise ImportError('the user project\\'s own {name} package')\n")
    return directory


def test_a_regular_install_works_from_a_folder_that_shadows_the_old_names(wheel, tmp_path):
    """The wheel installed (not editable) beside the dependencies: the CLI, the migrations and the flows import."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "strata-deps.pth").write_text("\n".join(deps) + "\n")  # the dependencies, not the editable strata
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    project = _user_project(tmp_path / "project")
    code = (
        "import strata.cli.app, strata.flows.learn, pathlib\n"
        "from strata.tasks.ledger import migrate\n"
        "print(migrate.head_revision(), pathlib.Path(strata.flows.learn.__file__).parent)"
    )
    result = subprocess.run(
        [str(python), "-c", code], cwd=project, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    head, location = result.stdout.split()
    from strata.tasks.ledger import migrate

    assert head == migrate.head_revision() and Path(location) == Path(site) / "strata" / "flows"


def test_a_logged_model_loads_with_mlflow_beside_a_users_models_package(tmp_path, prefect_server, digit_batches):
    from strata.flows.learn import LearnParams, learn
    from strata.tasks.data.ingest import ingest
    from strata.tasks.tracking.promotion import GateConfig
    from strata.tasks.workspace.settings import load_settings
    from strata.tasks.workspace.setup import init_workspace

    init_workspace(tmp_path / "ws")
    settings = load_settings(tmp_path / "ws")
    ingest(settings, digit_batches[0], "digits", 0.25, 0)
    learn(
        LearnParams(
            learner="digits",
            method="simplecil",
            backbone="tiny",
            gate=GateConfig(),
            workspace=str(settings.workspace),
            show_progress=False,
        )
    )
    project = _user_project(tmp_path / "project")
    pixels = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    np.save(project / "pixels.npy", pixels)
    code = (
        "import json, sys, mlflow, numpy as np\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "model = mlflow.pyfunc.load_model('models:/strata-digits@champion')\n"
        "requirements = open(mlflow.pyfunc.get_model_dependencies('models:/strata-digits@champion')).read()\n"
        "print(json.dumps({'predictions': list(model.predict(np.load('pixels.npy'))),\n"
        "                  'requirements': requirements.split()}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, settings.mlflow_tracking_uri], cwd=project, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(answer["predictions"]) == 2 and set(answer["predictions"]) <= {"0", "1"}
    from importlib.metadata import version

    assert f"strata-cil=={version('strata-cil')}" in answer["requirements"]
    assert "strata" not in answer["requirements"]
