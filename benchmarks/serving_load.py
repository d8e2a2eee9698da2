"""The model server under load while ``champion`` moves: N concurrent asyncio clients, as JSON.

Why this way: the server runs as ``strata serve --learner L --alias champion`` in its own process (the
command users run, uvicorn logging included), following the alias in a throwaway workspace's MLflow
promotion. Two versions (SimpleCIL after 2 and after 3 synthetic tasks, prototypes built, not trained:
the cost of a forward does not depend on the learned values) are exported where the server looks for
them, so it never exports; v2 is registered while the server starts on v1. Each client holds its own
connection and posts one PNG per request, with the API key a non-loopback deployment must have, as
fast as answers come, for ``--seconds`` after one untimed warm-up request each. Halfway through,
``champion`` moves from v1 to v2 (the registry call ``strata promote`` makes); the load goes on until
the server has swapped (at most ``--reload-timeout`` more seconds).

Figures: requests, transport errors and non-2xx answers (counts and the first messages), latency
percentiles and throughput of the 2xx answers, answers per version for requests sent before and after
the move, the seconds from the move to the first v2 answer, v1 answers to requests sent after that
(must be 0: a swap is one assignment), whether the server logged the reload, the answers to a request
without the key and with a wrong one (401 each), and whether either key reached the server's log. Client and server
share this machine's cores, so the figures are for the pair, and comparable only on the same machine.

    python -m benchmarks.serving_load [--clients 50 --seconds 20 --backbone tiny --poll-seconds 0.2]
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks import common
from strata.models.methods import create_method
from strata.tasks.export.layout import published
from strata.tasks.export.onnx_graph import export_method
from strata.tasks.tracking import promotion, runs
from strata.tasks.workspace.settings import StrataSettings, load_settings
from strata.tasks.workspace.setup import init_workspace

LEARNER = "load"
FIRST_MESSAGES = 5


@dataclass(frozen=True)
class Answer:
    """One request as its client saw it: a transport error has no status, a refusal (non-2xx) no version."""

    sent: float  # perf_counter seconds
    seconds: float
    status: int | None = None
    version: str | None = None
    error: str | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def strata_serve(
    source: list[str], log: Path, api_key: str | None = None, poll_seconds: float = 0.2, startup_seconds: float = 240
) -> Iterator[str]:
    """``strata serve SOURCE`` on a free loopback port in a subprocess; yields its URL.

    stdout and stderr go to ``log``, readable once the block exits (the server is stopped with SIGINT,
    as Ctrl-C would, so uvicorn shuts down cleanly and flushes its lines).
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "STRATA_SERVE_API_KEY"}
    if api_key:
        env["STRATA_SERVE_API_KEY"] = api_key
    command = [
        sys.executable,
        "-m",
        "strata.cli.app",
        "serve",
        *source,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--poll-seconds",
        str(poll_seconds),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1]
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(process, url, log, startup_seconds)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_up(process: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"strata serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"strata serve did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


class Versions:
    """The learner's registered model and its exports, as ``strata learn`` and ``strata export`` leave them.

    Each version is SimpleCIL over more synthetic tasks; its export lies where ``strata serve --learner``
    looks for it, so the server never exports.
    """

    def __init__(self, settings: StrataSettings, backbone: str):
        self.settings, self.name = settings, runs.model_name(LEARNER)
        self.client = runs.configure(settings)
        self.client.create_registered_model(self.name)
        self.method = create_method("simplecil", common.backbone(backbone))
        self.size = self.method.backbone.image_size
        self.tasks = iter(common.synthetic_tasks(3, 2, 8, self.size))

    def register(self, tasks: int) -> str:
        """Learn ``tasks`` more tasks (prototypes only), register and export the method; returns the version."""
        for _ in range(tasks):
            self.method.begin_task(next(self.tasks))
        folder = self.settings.state_dir / "exports" / LEARNER
        version = str(self.client.create_model_version(self.name, source=folder.resolve().as_uri()).version)
        with published(folder / f"v{version}") as out:  # complete with its manifest, as `strata export` leaves it
            export_method(self.method.eval(), out, extra_meta={"version": version, "learner": LEARNER})
        return version

    def move_champion(self, version: str) -> None:
        """What ``strata promote`` does to the registry (it also records the move in the ledger)."""
        promotion.set_alias(self.client, self.name, promotion.CHAMPION, version)


def png(size: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Load:
    """Clients posting until ``stop``; ``reloaded`` is set by the first answer from version ``new``."""

    def __init__(self, url: str, api_key: str, image: bytes, new: str):
        self.url, self.api_key, self.image, self.new = url, api_key, image, new
        self.answers: list[Answer] = []
        self.stop, self.reloaded = asyncio.Event(), asyncio.Event()
        self.first_new: float | None = None

    def connect(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"X-API-Key": self.api_key}, timeout=60)

    async def post(self, http: httpx.AsyncClient) -> httpx.Response:
        return await http.post("/predict", files={"files": ("x.png", self.image, "image/png")})

    async def client(self, http: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            sent = time.perf_counter()
            try:
                response = await self.post(http)
            except httpx.HTTPError as exc:
                self.answers.append(Answer(sent, time.perf_counter() - sent, error=f"{type(exc).__name__}: {exc}"))
                continue
            seconds = time.perf_counter() - sent
            if not response.is_success:
                self.answers.append(Answer(sent, seconds, response.status_code, error=response.text[:200]))
                continue
            version = response.json()["version"]
            self.answers.append(Answer(sent, seconds, response.status_code, version))
            if version == self.new and self.first_new is None:
                self.first_new = time.perf_counter()
                self.reloaded.set()


async def drive(load: Load, clients: int, seconds: float, reload_timeout: float, move) -> dict[str, float]:
    """Open the connections and send one untimed request on each (a failure there raises), so the figures
    leave out connection set-up and the server's first batches; then run the clients, move the champion
    halfway, and stop after ``seconds`` and the swap (or its timeout)."""
    async with contextlib.AsyncExitStack() as stack:
        connections = [await stack.enter_async_context(load.connect()) for _ in range(clients)]
        for response in await asyncio.gather(*(load.post(http) for http in connections)):
            response.raise_for_status()
        workers = [asyncio.create_task(load.client(http)) for http in connections]
        start = time.perf_counter()
        await asyncio.sleep(seconds / 2)
        move_started = time.perf_counter()
        await asyncio.to_thread(move)
        move_done = time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(load.reloaded.wait(), reload_timeout)
        await asyncio.sleep(max(0.0, start + seconds - time.perf_counter()))
        load.stop.set()
        await asyncio.gather(*workers)
    return {"start": start, "move_started": move_started, "move_done": move_done, "end": time.perf_counter()}


def summarise(load: Load, times: dict[str, float], old: str) -> dict:
    answers = load.answers
    ok = [a for a in answers if a.version is not None]
    failed = [a for a in answers if a.status is None]
    refused = [a for a in answers if a.status is not None and a.version is None]
    milliseconds = np.array([a.seconds for a in ok]) * 1000 if ok else np.zeros(1)
    before = [a for a in ok if a.sent < times["move_started"]]
    after = [a for a in ok if a.sent >= times["move_started"]]
    first_new = load.first_new
    swap = [a for a in answers if times["move_started"] <= a.sent <= (first_new or times["end"])]
    return {
        "requests": len(answers),
        "errors": {"count": len(failed), "first": [a.error for a in failed[:FIRST_MESSAGES]]},
        "non_2xx": {"count": len(refused), "first": [f"{a.status}: {a.error}" for a in refused[:FIRST_MESSAGES]]},
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 2),
        "p99_ms": round(float(np.percentile(milliseconds, 99)), 2),
        "max_ms": round(float(milliseconds.max()), 2),
        "load_seconds": round(times["end"] - times["start"], 2),
        "throughput_rps": round(len(ok) / (times["end"] - times["start"]), 1),
        "versions_before_move": dict(Counter(a.version for a in before)),
        "versions_after_move": dict(Counter(a.version for a in after)),
        "reload_observed": first_new is not None,
        "reload_seconds": round(first_new - times["move_done"], 2) if first_new else None,
        "during_swap": {"requests": len(swap), "failed": sum(a.version is None for a in swap)},
        "old_version_after_reload": sum(a.version == old for a in ok if first_new and a.sent >= first_new),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients, one connection each")
    parser.add_argument("--seconds", type=float, default=20.0, help="load duration; the champion moves halfway")
    parser.add_argument("--poll-seconds", type=float, default=0.2, help="the server's alias polling interval")
    parser.add_argument("--reload-timeout", type=float, default=60.0, help="longest wait for the swap")
    args = parser.parse_args(argv)
    common.setup(args)
    api_key, wrong_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="strata-load-") as scratch, ThreadPoolExecutor(1) as pool:
        init_workspace(Path(scratch) / "workspace")  # a real workspace: `strata serve --workspace` checks for one
        versions = Versions(load_settings(Path(scratch) / "workspace"), args.backbone)
        old = versions.register(2)
        versions.move_champion(old)
        pending = pool.submit(versions.register, 1)  # v2 is learned and registered while the server starts
        log = Path(scratch) / "serve.log"
        source = ["--learner", LEARNER, "--alias", promotion.CHAMPION, "--workspace", str(versions.settings.workspace)]
        print(f"serving v{old} …", file=sys.stderr)
        with strata_serve(source, log, api_key, args.poll_seconds) as url:
            new = pending.result()
            refused = {
                name: httpx.post(
                    f"{url}/predict", files={"files": ("x.png", png(versions.size, 0))}, headers=headers, timeout=30
                ).status_code
                for name, headers in (("missing_key", {}), ("wrong_key", {"X-API-Key": wrong_key}))
            }
            print(f"{args.clients} clients for {args.seconds:g} s, champion → v{new} halfway …", file=sys.stderr)
            load = Load(url, api_key, png(versions.size, 0), new)
            times = asyncio.run(
                drive(load, args.clients, args.seconds, args.reload_timeout, lambda: versions.move_champion(new))
            )
        server_log = log.read_text()
    document = {
        "benchmark": "serving_load",
        "clients": args.clients,
        "seconds": args.seconds,
        **summarise(load, times, old),
        "server_logged_reload": f"version {new} (was {old})" in server_log,
        "refused_without_the_key": refused,
        "keys_in_server_log": api_key in server_log or wrong_key in server_log,
        "setup": {
            "server": f"strata serve --learner {LEARNER} --alias champion (subprocess, 127.0.0.1, API key)",
            "poll_seconds": args.poll_seconds,
            "client": "httpx.AsyncClient, one connection per client",
            "request": f"one {versions.size}x{versions.size} PNG (multipart)",
            "model": f"simplecil on {args.backbone} (random-init weights), v{old} 4 classes, v{new} 6",
        },
        "machine": common.machine(),
    }
    common.emit(document)
    return document


if __name__ == "__main__":
    main()
