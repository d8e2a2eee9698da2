"""The model server end to end: a real uvicorn server over real exports, spoken to over HTTP."""

import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from strata.models.engine import Engine
from strata.models.methods import create_method
from strata.tasks.export.onnx_graph import export_method
from strata.tasks.serving.app import ModelHolder, ServeConfig, ServeError, check_bind, create_app
from strata.tasks.serving.loaded_model import load_model
from strata.tasks.serving.sources import ExportDirSource, ModelRef, ModelSourceError

KEY = "s3cret-key"


class SwitchSource:
    """A source whose answer the test moves, like an alias moving to another registered version."""

    def __init__(self, ref: ModelRef):
        self.ref = ref

    def current(self) -> ModelRef:
        return self.ref


class CountingSession:
    """Wraps an onnxruntime session and counts its ``run`` calls."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free loopback port in a background thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, synthetic_stream, tiny_backbone_factory):
    """A tiny SimpleCIL exported after 2 tasks (4 classes, a/) and after 3 (6 classes, b/), and the method."""
    root = tmp_path_factory.mktemp("exports")
    engine = Engine("cpu", seed=0, show_progress=False)
    method = create_method("simplecil", tiny_backbone_factory(), overrides={"train": {"epochs": 1, "batch_size": 8}})
    for task in synthetic_stream.tasks[:2]:
        method.learn(task, engine)
    export_method(method.eval(), root / "a")
    method.learn(synthetic_stream.tasks[2], engine)
    export_method(method.eval(), root / "b")
    return root, method


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _tensor(seed: int, batch: int = 1) -> list:
    return np.random.default_rng(seed).random((batch, 3, 32, 32), dtype=np.float32).tolist()


def test_uploads_match_pytorch_and_json_tensors_work(exports, synthetic_stream):
    root, method = exports
    images = [synthetic_stream.tasks[t].test[i][0] for t in range(3) for i in (0, 1)]
    with running(create_app(ExportDirSource(root / "b"))) as url, httpx.Client(base_url=url, timeout=30) as client:
        info = client.get("/model").json()
        assert info["provider"] == "CPUExecutionProvider" and info["method"] == "simplecil"
        assert info["classes"] == method.class_names and info["input"]["shape"] == ["batch", 3, 32, 32]
        files = [("files", (f"{i}.png", _png(img), "image/png")) for i, img in enumerate(images)]
        files.append(("files", ("last.jpg", _png(images[-1], "JPEG"), "image/jpeg")))
        answer = client.post("/predict", files=files, params={"k": 3})
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]

        jpeg = Image.open(io.BytesIO(files[-1][1][1])).convert("RGB")
        batch = torch.stack([method.test_transform()(img) for img in [*images, jpeg]])
        with torch.inference_mode():
            expected = method(batch).softmax(1).numpy()
        assert [p[0]["class"] for p in predictions] == [method.class_names[i] for i in expected.argmax(1)]
        assert all(len(p) == 3 for p in predictions)
        got = np.array([p[0]["probability"] for p in predictions])
        np.testing.assert_allclose(got, expected.max(1), atol=1e-4)

        pixels = _tensor(0, batch=2)
        answer = client.post("/predict", json={"pixels": pixels})
        assert answer.status_code == 200, answer.text
        with torch.inference_mode():
            expected = method(torch.tensor(pixels)).softmax(1).numpy()
        top = answer.json()["predictions"]
        assert [p[0]["class"] for p in top] == [method.class_names[i] for i in expected.argmax(1)]
        assert len(top[0]) == 5  # k defaults to 5 of the 6 classes: all but the least likely
        assert sum(c["probability"] for c in top[0]) == pytest.approx(1 - expected[0].min(), abs=1e-4)


def test_micro_batching_runs_concurrent_requests_together(exports):
    root, _ = exports
    app = create_app(ExportDirSource(root / "a"), ServeConfig(max_batch=8, max_wait_ms=300))
    holder = app.state.holder
    counter = holder.model.session = CountingSession(holder.model.session)
    inputs = [_tensor(seed) for seed in range(16)]

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/predict", json={"pixels": x}) for x in inputs))

    with running(app) as url:
        answers = asyncio.run(burst(url))
    assert all(a.status_code == 200 for a in answers)
    assert 2 <= counter.runs <= 8 and app.state.batcher.requests == 16  # 16 requests, ≤ 8 per batch
    model = holder.model
    for x, answer in zip(inputs, answers, strict=True):  # each request got its own slice of the batch
        expected = model.predict(np.asarray(x, dtype=np.float32))[0]
        assert answer.json()["predictions"][0][0]["probability"] == pytest.approx(float(expected.max()), abs=1e-5)


def test_hot_reload_swaps_without_failing_requests(exports, tmp_path):
    root, _ = exports
    source = SwitchSource(ExportDirSource(root / "a").current())
    app = create_app(source, ServeConfig(poll_seconds=0.05))
    stop, answers = threading.Event(), []

    def hammer(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            seed = 0
            while not stop.is_set():
                seed += 1
                answers.append(client.post("/predict", json={"pixels": _tensor(seed)}))

    with running(app) as url, ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(hammer, url) for _ in range(4)]
        time.sleep(0.3)
        source.ref = ExportDirSource(root / "b").current()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/model").json()["version"] != source.ref.version:
            assert time.monotonic() < deadline, "the server did not reload"
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        [w.result() for w in workers]
        info = httpx.get(f"{url}/model").json()
    assert answers and all(a.status_code == 200 for a in answers), {a.status_code for a in answers}
    versions = [a.json()["version"] for a in answers]
    assert versions[0] != source.ref.version and versions[-1] == source.ref.version
    assert len(info["classes"]) == 6 and info["provider"] == "CPUExecutionProvider"


def test_failed_load_keeps_the_old_model(exports, tmp_path):
    root, _ = exports
    broken = tmp_path / "broken"
    shutil.copytree(root / "b", broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    source = SwitchSource(ExportDirSource(root / "a").current())
    holder = ModelHolder.load(source)
    served = holder.model
    source.ref = ModelRef("broken", broken)
    assert holder.refresh() is False and holder.model is served
    source.ref = ExportDirSource(root / "b").current()
    assert holder.refresh() is True and len(holder.model.labels) == 6
    with pytest.raises(ServeError, match="no servable model"):
        ModelHolder.load(SwitchSource(ModelRef("broken", broken)))


def test_export_dir_source_versions(exports, tmp_path):
    root, _ = exports
    link = tmp_path / "current"
    link.symlink_to(root / "a")
    source = ExportDirSource(link)
    first = source.current()
    assert len(first.version) == 12 and first.directory == (root / "a").resolve()
    assert source.current() == first  # stable while nothing changes
    swap = tmp_path / "swap"
    swap.symlink_to(root / "b")
    os.replace(swap, link)  # atomic publish
    assert source.current().version != first.version and source.current().directory == (root / "b").resolve()
    declared = tmp_path / "declared"
    shutil.copytree(root / "a", declared)
    meta = json.loads((declared / "model.json").read_text())
    (declared / "model.json").write_text(json.dumps({**meta, "version": "7"}))
    assert ExportDirSource(declared).current().version == "7"
    with pytest.raises(ModelSourceError, match="missing"):
        ExportDirSource(tmp_path / "nowhere").current()


@pytest.fixture(scope="module")
def guarded(exports):
    """One server with an API key and small limits, and clients with and without the key."""
    root, _ = exports
    config = ServeConfig(api_key=KEY, max_upload_bytes=100_000, max_images=3)
    assert KEY not in repr(config)
    with (
        running(create_app(ExportDirSource(root / "a"), config)) as url,
        httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": KEY}) as keyed,
        httpx.Client(base_url=url, timeout=30) as anonymous,
    ):
        assert anonymous.get("/health").status_code == 200  # the one open path
        yield keyed, anonymous


TINY_PNG = _png(Image.new("RGB", (8, 8)))
GOOD = {"pixels": _tensor(0)}
BAD_REQUESTS = {  # what the request is: (client with the key?, request, status, words the answer must hold)
    "missing-api-key": (False, lambda c: c.post("/predict", json=GOOD), 401, "missing API key"),
    "missing-api-key-model": (False, lambda c: c.get("/model"), 401, "X-API-Key"),
    "wrong-api-key": (
        False,
        lambda c: c.post("/predict", json=GOOD, headers={"X-API-Key": "nope"}),
        401,
        "wrong API key",
    ),
    "non-image-upload": (
        True,
        lambda c: c.post("/predict", files={"files": ("a.txt", b"hello", "text/plain")}),
        415,
        "not a readable",
    ),
    "unaccepted-format-upload": (  # an image, but not in the one list ingest and serving share (GIF now is)
        True,
        lambda c: c.post("/predict", files={"files": ("a.ppm", _png(Image.open(io.BytesIO(TINY_PNG)), "PPM"))}),
        415,
        "format PPM is not accepted",
    ),
    "form-without-files": (True, lambda c: c.post("/predict", data={"name": "x"}, files={}), 415, "multipart"),
    "wrong-tensor-shape": (
        True,
        lambda c: c.post("/predict", json={"pixels": _tensor(0)[0]}),
        422,
        "(batch, 3, 32, 32)",
    ),
    "ragged-tensor": (True, lambda c: c.post("/predict", json={"pixels": [[1, 2], [3]]}), 422, "rectangular"),
    "json-without-pixels": (True, lambda c: c.post("/predict", json={"image": 1}), 422, "expected a JSON object"),
    "malformed-json": (
        True,
        lambda c: c.post("/predict", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "malformed JSON",
    ),
    "oversize-upload": (
        True,
        lambda c: c.post("/predict", files={"files": ("big.png", b"\0" * 200_000, "image/png")}),
        413,
        "limit",
    ),
    "oversize-streamed-body": (
        True,
        lambda c: c.post(
            "/predict", content=iter([b"{" + b" " * 60_000] * 3), headers={"content-type": "application/json"}
        ),
        413,
        "limit",
    ),
    "too-many-images": (
        True,
        lambda c: c.post("/predict", files=[("files", (f"{i}.png", TINY_PNG, "image/png")) for i in range(4)]),
        413,
        "more than 3 images",
    ),
    "k-below-one": (True, lambda c: c.post("/predict", json=GOOD, params={"k": 0}), 422, "greater than or equal to 1"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving(guarded, case):
    keyed, anonymous = guarded
    with_key, send, status, words = BAD_REQUESTS[case]
    answer = send(keyed if with_key else anonymous)
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert words in answer.text, answer.text
    assert keyed.post("/predict", json=GOOD).status_code == 200
    assert keyed.get("/model").json()["provider"] == "CPUExecutionProvider"


def test_refuses_a_public_bind_without_an_api_key(exports, monkeypatch):
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        with pytest.raises(ServeError, match="STRATA_SERVE_API_KEY"):
            check_bind(host, None)
        check_bind(host, KEY)
    for host in ("127.0.0.1", "::1", "localhost"):
        check_bind(host, None)
    from typer.testing import CliRunner

    from strata.cli.app import app

    monkeypatch.delenv("STRATA_SERVE_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "--model-dir", str(exports[0] / "a"), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "without an API key" in result.output


def test_graph_with_preprocessing_takes_uploads(exports, tmp_path, synthetic_stream):
    _, method = exports
    export_method(method, tmp_path, preprocess_hw=(48, 40))
    model = load_model(ExportDirSource(tmp_path).current())
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    with running(create_app(ExportDirSource(tmp_path))) as url:
        answer = httpx.post(f"{url}/predict", files={"files": ("x.png", _png(image), "image/png")}, timeout=30)
    assert answer.status_code == 200, answer.text
    expected = model.predict(np.asarray(image)[None])[0]
    assert answer.json()["predictions"][0][0]["class"] == method.class_names[int(expected.argmax())]
