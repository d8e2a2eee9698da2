"""The HTTP server over one onnxruntime session: the FastAPI app factory and the model holder.

``POST /predict`` takes image files (multipart: the formats ingest accepts, decoded as in training) or a
JSON tensor ``{"pixels": [...]}`` and answers the top-k classes with probabilities; ``GET /model`` says
what is served and on which execution provider; ``GET /health`` is the unauthenticated liveness probe.
Concurrent requests are batched (:mod:`strata.tasks.serving.batcher`). The :class:`ModelHolder` polls a
:class:`~strata.tasks.serving.sources.ModelSource` and, when the version or the directory's content moves,
builds and warms the new session *before* swapping it in; a model that fails to load is logged once per
content and the old one keeps serving. With
an API key every request but ``/health`` must carry it in ``X-API-Key``; the key never appears in logs or reprs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strata.models.errors import UserError
from strata.models.images import MAX_PIXELS, accepted_formats
from strata.tasks.serving.batcher import MicroBatcher
from strata.tasks.serving.json_tensors import TensorSpec, tensor_from_json
from strata.tasks.serving.loaded_model import LoadedModel, ModelLoadError, RequestError, load_model
from strata.tasks.serving.sources import ModelRef, ModelSource, content_stamp

logger = logging.getLogger(__name__)
API_KEY_HEADER = "X-API-Key"
OPEN_PATHS = frozenset({"/health"})


class ServeError(UserError, RuntimeError):
    """The server cannot start as asked (unsafe bind, no servable model)."""


@dataclass(frozen=True)
class ServeConfig:
    poll_seconds: float = 2.0
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_images: int = 32
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = MAX_PIXELS  # per decoded image: a decompression-bomb bound, checked from the header
    max_request_pixels: int = 100_000_000  # all images of one request together, checked before decoding any
    api_key: str | None = field(default=None, repr=False)


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose an unauthenticated server beyond this machine."""
    if api_key:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ServeError(
            f"refusing to serve on {host!r} without an API key: set STRATA_SERVE_API_KEY (clients then "
            f"send it as {API_KEY_HEADER}) or bind to 127.0.0.1"
        )


class ModelHolder:
    """The model being served; ``model`` is replaced in one assignment, never mutated."""

    def __init__(self, source: ModelSource, model: LoadedModel, content: Content):
        self.source = source
        self.model = model
        self._served = content
        self._failed: Content | None = None
        self._last_error: str | None = None

    @classmethod
    def load(cls, source: ModelSource) -> ModelHolder:
        try:
            ref = source.current()
            content = _content(ref)
            model = load_model(ref)
        except Exception as exc:
            raise ServeError(f"no servable model: {exc}") from exc
        logger.info("serving %s version %s on %s", model.meta.get("method"), model.ref.version, model.provider)
        return cls(source, model, content)

    def refresh(self) -> bool:
        """Swap in the source's current model if its version or content moved; True when it did. Never raises.

        A content that failed to load is logged once and not tried again; once the directory changes (fixed,
        finished, re-published) it is tried at the next poll.
        """
        try:
            ref = self.source.current()
            content = _content(ref)
        except Exception as exc:
            self._log_once(f"model source unavailable, still serving {self.model.ref.version}: {exc}")
            return False
        self._last_error = None
        if content in (self._served, self._failed):
            return False
        try:
            model = load_model(ref)
        except ModelLoadError as exc:
            self._failed = content
            logger.error("version %s not loaded, still serving %s: %s", ref.version, self.model.ref.version, exc)
            return False
        previous, self.model, self._served, self._failed = self.model.ref.version, model, content, None
        logger.info(
            "reloaded: serving %s version %s (was %s) on %s",
            model.meta.get("method"),
            ref.version,
            previous,
            model.provider,
        )
        return True

    async def watch(self, poll_seconds: float) -> None:
        while True:
            await asyncio.sleep(poll_seconds)
            await asyncio.to_thread(self.refresh)

    def _log_once(self, message: str) -> None:
        if message != self._last_error:
            logger.warning(message)
            self._last_error = message


Content = tuple[str, Path, str]  # version, directory, content_stamp: what one load attempt was made of


def _content(ref: ModelRef) -> Content:
    return ref.version, ref.directory, content_stamp(ref.directory)


class RequestGuard:
    """ASGI middleware: the API key (401) and the upload size (413) are checked before any body is read."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN_PATHS:
            given = headers.get(API_KEY_HEADER.lower(), "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                reason = "missing" if not given else "wrong"
                return await _error(401, f"{reason} API key: send it in the {API_KEY_HEADER} header")(
                    scope, receive, send
                )
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large()(scope, receive, send)
        received, started = 0, False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large()(scope, receive, send)

    def _too_large(self) -> JSONResponse:
        return _error(413, f"request body over the limit of {self.max_bytes} bytes")


class _BodyTooLarge(Exception):
    pass


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def create_app(source: ModelSource, config: ServeConfig | None = None) -> FastAPI:
    """The app; the first model is loaded now, so a bad source fails before the server binds."""
    config = config or ServeConfig()
    holder = ModelHolder.load(source)
    batcher = MicroBatcher(config.max_batch, config.max_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(batcher.run()), asyncio.create_task(holder.watch(config.poll_seconds))]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(title="Strata model server", lifespan=lifespan)
    app.add_middleware(RequestGuard, api_key=config.api_key, max_bytes=config.max_upload_bytes)
    app.state.holder, app.state.batcher, app.state.config = holder, batcher, config

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": holder.model.ref.version}

    @app.get("/model")
    async def model_info() -> dict[str, Any]:
        model = holder.model
        return {
            "version": model.ref.version,
            "method": model.meta.get("method"),
            "backbone": model.meta.get("backbone", {}).get("name"),
            "classes": model.labels,
            "provider": model.provider,
            "providers": model.session.get_providers(),
            "input": model.meta["input"],
            "output": model.meta.get("output"),
            "precision": model.meta.get("precision"),
            "loaded_at": model.loaded_at,
            "batching": {
                "max_batch": batcher.max_batch,
                "max_wait_ms": config.max_wait_ms,
                "batches": batcher.batches,
                "requests": batcher.requests,
            },
            "limits": {
                "max_images": config.max_images,
                "max_upload_bytes": config.max_upload_bytes,
                "max_pixels": config.max_pixels,
                "max_request_pixels": config.max_request_pixels,
            },
        }

    @app.post("/predict")
    async def predict(request: Request, k: int = Query(5, ge=1, description="classes per image")) -> dict[str, Any]:
        model = holder.model  # preprocessed for and run on this model, even if a reload happens meanwhile
        kind = request.headers.get("content-type", "")
        try:
            if kind.startswith("multipart/form-data"):
                rows = await _uploaded_images(request, model, config)
            elif kind.startswith("application/json"):
                rows = await asyncio.to_thread(_json_tensor, await request.body(), model)
            else:
                raise RequestError(
                    415,
                    "send image files as multipart/form-data, or application/json "
                    f'{{"pixels": ...}} of shape {model.expected_shape}',
                )
            if len(rows) > config.max_images:
                raise RequestError(413, f"{len(rows)} images in one request; the limit is {config.max_images}")
        except RequestError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        probabilities = await batcher.submit(model, rows)
        return {"version": model.ref.version, "predictions": model.top_k(probabilities, k)}

    return app


async def _uploaded_images(request: Request, model: LoadedModel, config: ServeConfig) -> np.ndarray:
    async with request.form(max_files=config.max_images + 1, max_part_size=config.max_upload_bytes) as form:
        files = [
            (value.filename or key, await value.read())
            for key, value in form.multi_items()
            if isinstance(value, UploadFile)
        ]
    if not files:
        raise RequestError(
            400, f"no image files in the form: send image files ({accepted_formats()}) as multipart field 'files'"
        )
    if len(files) > config.max_images:
        raise RequestError(413, f"more than {config.max_images} images in one request")
    return await asyncio.to_thread(model.images, files, config.max_pixels, config.max_request_pixels)


def _json_tensor(body: bytes, model: LoadedModel) -> np.ndarray:
    return tensor_from_json(body, TensorSpec.of(model.meta, model.image_shape, model.dtype))
