"""Publishing and serving exports: complete-or-absent folders, reloads by content, strict JSON tensors.

Real onnxruntime sessions over the tiny exports of ``tests.test_serving``, a real uvicorn server spoken to
over HTTP, and a real SIGKILL in the middle of writing an export.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from strata.tasks.export.layout import MANIFEST_FILE, manifest_problem, published, remove_stale
from strata.tasks.export.onnx_graph import export_method
from strata.tasks.serving.app import ModelHolder, ServeConfig, create_app
from strata.tasks.serving.sources import ExportDirSource
from tests import test_serving
from tests.test_serving import _tensor, running

exports = test_serving.exports  # the module's tiny exports (a fixture), shared rather than built again

KILLED_EXPORT = """
import os, shutil, signal, sys
from pathlib import Path
from strata.tasks.export.layout import published
source, out = Path(sys.argv[1]), Path(sys.argv[2])
with published(out) as folder:
    shutil.copyfile(source / "model.onnx", folder / "model.onnx")
    os.kill(os.getpid(), signal.SIGKILL)  # killed before labels.json, model.json and the manifest
"""


def _publish(source, out, version: str | None = None):
    """Publish a copy of the export at ``source``, declaring ``version`` in its model.json if given."""
    with published(out) as folder:
        for name in ("model.onnx", "labels.json", "model.json"):
            shutil.copyfile(source / name, folder / name)
        if version is not None:
            meta = json.loads((folder / "model.json").read_text())
            (folder / "model.json").write_text(json.dumps({**meta, "version": version}))


def test_a_killed_export_leaves_only_a_partial_folder_that_the_next_export_removes(exports, tmp_path):
    root, _ = exports
    out = tmp_path / "exports" / "v1"
    killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(root / "a"), str(out)])
    assert killed.returncode == -9
    (partial,) = (tmp_path / "exports").iterdir()
    assert partial.name.startswith("v1.partial-") and (partial / "model.onnx").is_file()
    assert not out.exists()  # nothing at the published path for a server or `strata serve --learner` to read

    _publish(root / "a", out)
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["v1"]
    assert manifest_problem(out, hashes=True) is None
    assert sorted(json.loads((out / MANIFEST_FILE).read_text())["files"]) == ["labels.json", "model.json", "model.onnx"]

    with pytest.raises(RuntimeError, match="parity"), published(out) as folder:  # a failed re-export
        shutil.copyfile(root / "b" / "model.onnx", folder / "model.onnx")
        raise RuntimeError("parity gate failed")
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["v1"] and remove_stale(out) == []
    assert manifest_problem(out, hashes=True) is None  # the earlier export is untouched


def test_an_export_never_replaces_a_folder_of_other_files(exports, tmp_path):
    root, _ = exports
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(Exception, match="not an export .*thesis.tex"):
        _publish(root / "a", mine)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_a_fixed_or_republished_directory_is_reloaded_and_a_failure_logged_once(exports, tmp_path, caplog):
    root, _ = exports
    served = tmp_path / "served"
    _publish(root / "a", served, version="7")  # a declared version, kept by the republished folders below
    app = create_app(ExportDirSource(served), ServeConfig(poll_seconds=0.05))
    caplog.set_level(logging.ERROR, logger="strata.tasks.serving.app")
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert len(client.get("/model").json()["classes"]) == 4
        broken = tmp_path / "broken"  # re-published under the same version: a graph that is not ONNX
        _publish(root / "b", broken, version="7")
        (broken / "model.onnx").write_bytes(b"not an onnx graph")
        (broken / MANIFEST_FILE).unlink()  # as an export written in place, not by `strata export`, would be
        shutil.rmtree(served)
        broken.rename(served)
        time.sleep(0.5)  # ten polls of the same broken content
        assert client.post("/predict", json={"pixels": _tensor(0)}).status_code == 200  # the old model serves on
        failures = [r for r in caplog.records if "not loaded" in r.getMessage()]
        assert len(failures) == 1 and "version 7" in failures[0].getMessage()

        shutil.copyfile(root / "b" / "model.onnx", served / "model.onnx")  # fixed in place, same version
        deadline = time.monotonic() + 10
        while len(client.get("/model").json()["classes"]) != 6:
            assert time.monotonic() < deadline, "the fixed directory was not reloaded"
            time.sleep(0.05)
        assert client.get("/model").json()["version"] == "7"


def test_a_published_export_that_does_not_match_its_manifest_is_refused(exports, tmp_path):
    root, _ = exports
    out = tmp_path / "v2"
    _publish(root / "b", out)
    with (out / "model.onnx").open("ab") as graph:
        graph.write(b"\0")
    assert "bytes" in manifest_problem(out)
    with pytest.raises(Exception, match="model.onnx has .* bytes, the manifest says"):
        ModelHolder.load(ExportDirSource(out))


@pytest.fixture(scope="module")
def float_and_uint8_servers(exports, tmp_path_factory):
    """One server over the float export (NCHW, range [0, 1]) and one over an export with preprocessing (uint8)."""
    root, method = exports
    uint8 = tmp_path_factory.mktemp("uint8")
    export_method(method, uint8, preprocess_hw=(8, 8))
    with (
        running(create_app(ExportDirSource(root / "a"))) as float_url,
        running(create_app(ExportDirSource(uint8))) as uint8_url,
        httpx.Client(base_url=float_url, timeout=30) as floats,
        httpx.Client(base_url=uint8_url, timeout=30) as bytes_,
    ):
        yield floats, bytes_


def _with(value: object, shape: tuple[int, ...] = (3, 32, 32)) -> list:
    """One image of 0.5 with its first value replaced by ``value``."""
    image = np.full(shape, 0.5).tolist()
    image[0][0][0] = value
    return [image]


BAD_TENSORS = {  # pixels → words the 422 must hold
    "numeric-string": (_with("0.5"), 'numbers only; found "0.5"'),
    "boolean": (_with(True), "numbers only; found true"),
    "null": (_with(None), "numbers only; found null"),
    "nested-too-deep": (_with([0.5]), "numbers only; found [0.5]"),
    "too-shallow": ([[[0.5] * 32] * 3], "level 3 holds something that is not a list"),
    "wrong-shape": ([np.zeros((3, 32, 31)).tolist()], "not 32"),
    "empty-batch": ([], "the batch is empty"),
    "above-range": (_with(3.0), "values lie in [0.5, 3]; this model takes values in [0, 1]"),
    "below-range": (_with(-0.5), "takes values in [0, 1]"),
    "huge-integer": (_with(10**400), "too large"),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_a_json_tensor_is_numbers_of_the_right_shape_inside_the_recorded_range(float_and_uint8_servers, case):
    floats, _ = float_and_uint8_servers
    pixels, words = BAD_TENSORS[case]
    answer = floats.post("/predict", json={"pixels": pixels})
    assert answer.status_code == 422 and words in answer.json()["detail"], answer.text
    assert floats.post("/predict", json={"pixels": _tensor(0)}).status_code == 200


def test_json_nan_and_uint8_inputs(float_and_uint8_servers):
    floats, bytes_ = float_and_uint8_servers
    nan = json.dumps({"pixels": _with(float("nan"))})  # Python's json writes NaN, and reads it back
    answer = floats.post("/predict", content=nan.encode(), headers={"content-type": "application/json"})
    assert answer.status_code == 422 and "finite" in answer.text
    image = np.full((1, 8, 8, 3), 128).tolist()
    assert bytes_.post("/predict", json={"pixels": image}).status_code == 200
    image[0][0][0][0] = 256
    answer = bytes_.post("/predict", json={"pixels": image})
    assert answer.status_code == 422 and "takes values in [0, 255]" in answer.text
    image[0][0][0][0] = 12.5
    answer = bytes_.post("/predict", json={"pixels": image})
    assert answer.status_code == 422 and "whole numbers" in answer.text
