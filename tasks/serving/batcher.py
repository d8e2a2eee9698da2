"""A small asyncio micro-batcher: concurrent requests share one ``session.run``.

Requests queue their preprocessed rows; one loop takes the oldest, waits up to ``max_wait_ms`` for
more (or until ``max_batch`` rows are queued), runs them as one batch in a worker thread — the event
loop keeps accepting requests meanwhile, so a busy server batches more — and hands each request its
slice. A batch only ever joins requests prepared for the same model object: after a hot reload the
requests already queued for the old model still run on it, and later ones on the new one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import numpy as np

from strata.tasks.serving.loaded_model import LoadedModel


@dataclass
class _Pending:
    model: LoadedModel
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]


class MicroBatcher:
    def __init__(self, max_batch: int, max_wait_ms: float):
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.batches = 0  # session.run calls so far
        self.requests = 0
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()

    async def submit(self, model: LoadedModel, rows: np.ndarray) -> np.ndarray:
        """Probabilities for ``rows`` once their batch has run (exceptions of the run propagate)."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(model, rows, future))
        self._arrived.set()
        return await future

    async def run(self) -> None:
        """Serve the queue forever (cancel the task to stop)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._queue:
                deadline = loop.time() + self.max_wait
                while self._ready_rows() < self.max_batch and (left := deadline - loop.time()) > 0:
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except TimeoutError:
                        break
                    self._arrived.clear()
                await self._run(self._take())

    def _ready_rows(self) -> int:
        model, rows = self._queue[0].model, 0
        for pending in self._queue:
            if pending.model is not model:
                break
            rows += len(pending.rows)
        return rows

    def _take(self) -> list[_Pending]:
        model, rows = self._queue[0].model, 0
        taken: list[_Pending] = []
        while self._queue and self._queue[0].model is model:
            size = len(self._queue[0].rows)
            if taken and rows + size > self.max_batch:
                break
            pending = self._queue.popleft()
            if not pending.future.done():  # a client that went away has cancelled its future
                taken.append(pending)
                rows += size
        return taken

    async def _run(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        model = batch[0].model
        self.batches += 1
        self.requests += len(batch)
        try:
            probabilities = await asyncio.to_thread(model.predict, np.concatenate([p.rows for p in batch]))
        except Exception as exc:  # the run failed for everyone in it; each request reports it
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        start = 0
        for pending in batch:
            end = start + len(pending.rows)
            if not pending.future.done():
                pending.future.set_result(probabilities[start:end])
            start = end
