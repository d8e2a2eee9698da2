"""Concurrent writers: N processes, each ingesting for and learning its own learner, write the ledger and
MLflow at once; afterwards every write is counted back from the stores.

What has to hold on SQLite and on PostgreSQL alike: no write a writer was told succeeded is missing
afterwards, and no error ("database is locked" above all) reaches a writer. SQLite admits one writer
at a time and makes the others wait (the ledger's busy timeout, MLflow's own); PostgreSQL locks rows.

Each writer is a spawned process (nothing inherited from this one) acting like ``strata ingest`` then
``strata learn`` of its learner ``writer-<n>``, round after round, through Strata's real task functions
minus DVC and training: it records a data version through the ORM as ``strata.tasks.data.ingest`` does after its
DVC steps, then takes the learner's lease, opens the parent MLflow run, gates stand-in figures against the
champion and hands them to the learn flow's own recorder (``strata.tasks.tracking.recorder``), which writes
the increment as the flow does: ledger row, child run (params, metrics, tags, data input, state, gate),
registered version, ledger commit, ``candidate`` and ``champion`` aliases, promotion record. Only the
version's content differs: the run's state artifacts rather than a pyfunc, whose logging loads a trained
method.

Two phases start behind barriers so that all writers hit the stores together:

* ``first_use``: every writer's first ``runs.configure`` at once on an empty MLflow database, the
  way the first ``learn`` runs of a new workspace create MLflow's store (the ledger is migrated
  beforehand, as ``strata init`` does);
* ``rounds``: the writes; ``writes_per_s`` is the number of items found stored afterwards (ledger rows,
  MLflow runs, params, metric points, tags, inputs, versions, aliases) per second of this phase.

    python -m benchmarks.concurrent_writers --backend sqlite --writers 8 --rounds 5
    python -m benchmarks.concurrent_writers --backend postgresql --writers 8 --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import logging
import multiprocessing
import queue
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Engine, make_url

from strata.tasks.ledger import migrate
from strata.tasks.ledger.increments import (
    configure_learner,
    fail_interrupted_increments,
    learned_tasks,
    pending_versions,
)
from strata.tasks.ledger.store import (
    DataVersion,
    Increment,
    LearnedClass,
    Learner,
    Lease,
    Promotion,
    get_or_create_learner,
    learner_lease,
    ledger_session,
    process_holder,
)
from strata.tasks.tracking import promotion, runs
from strata.tasks.tracking.figures import LearnerFigures
from strata.tasks.tracking.recorder import IncrementRecord, IncrementRecorder, RecorderScope
from strata.tasks.workspace.settings import StrataSettings, load_settings, redact_url

POSTGRES_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
START_TIMEOUT_S = 180  # spawning, imports and the first use of the stores
ROUNDS_TIMEOUT_S = 600
CLASSES_PER_ROUND = 2
ACCURACY = 0.5  # every figure of every round: the gate sees no drop and promotes each candidate
LOSSES = [0.9, 0.5]
PARAMS = runs.MethodParams(
    method="simplecil",
    config={"train": {"epochs": 2, "lr": 0.01}},
    backbone="tiny",
    backbone_source="random-init",
    weights_fingerprint="",
    seed=0,
)
IMAGE_SIZE = 32
CHILD_TAGS = (
    8  # the recorder's: learner, task_index, batch_id, dvc_md5, git_rev, prefect_flow_run_id, parent_version, gate
)
PARENT_TAGS = 2  # learner, writer
PARENT_METRICS = 2  # accuracy and Ā at the task's step
LEFTOVERS = ("other_increments", "leases_left")  # counted to be zero, not writes


def learner_name(writer: int) -> str:
    return f"writer-{writer}"


def batch_id(writer: int, round_index: int) -> str:
    return f"batch-w{writer:02d}r{round_index:04d}"


def record_version(engine: Engine, settings: StrataSettings, learner: str, batch: str, classes: list[str]) -> None:
    """The ledger row ``strata.tasks.data.ingest`` writes once DVC has versioned and pushed the batch."""
    with ledger_session(engine) as session:
        session.add(
            DataVersion(
                batch_id=batch,
                learner=get_or_create_learner(session, learner),
                path=f"data/batches/{batch}",
                classes={c: {"train": 3, "test": 1} for c in classes},
                split={"kind": "seeded", "seed": 0},
                md5=uuid.uuid4().hex,
                hash_name="md5",
                git_rev=uuid.uuid4().hex + "0" * 8,
                remote=settings.dvc_remote,
            )
        )


def figures_after(task_index: int) -> LearnerFigures:
    """Stand-in figures after ``task_index``: ACCURACY wherever ``summarize`` reports a figure, none missing."""
    tasks = task_index + 1
    same = [ACCURACY] * tasks
    return LearnerFigures(
        accuracy_matrix=[[ACCURACY] * (t + 1) + [None] * (tasks - t - 1) for t in range(tasks)],
        test_sizes=[CLASSES_PER_ROUND] * tasks,  # one test image per class, as record_version splits them
        accuracy=same,
        average_incremental_accuracy=ACCURACY,
        task_averaged_accuracy=same,
        forgetting=same,
        backward_transfer=same,
        old_accuracy=same,
        new_accuracy=same,
        final_accuracy=ACCURACY,
        final_forgetting=ACCURACY,
    )


CHILD_METRICS = len(figures_after(0).at(0).step_metrics()) + len(LOSSES)  # step figures, one train_loss per epoch


def register_state(client: MlflowClient, learner: str, model: runs.ModelPackage, tags: dict[str, str]) -> str:
    """The writers' stand-in for ``runs.log_and_register``: a version of the active child run's state artifacts."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("a model version is registered inside the increment's child run")
    return str(
        client.create_model_version(
            runs.model_name(learner), f"{run.info.artifact_uri}/state", run.info.run_id, tags=tags
        ).version
    )


def learn_round(engine: Engine, client: MlflowClient, settings: StrataSettings, writer: int, state_dir: Path) -> None:
    """One ``learn`` of the writer's learner: its one pending version, recorded by the learn flow's recorder."""
    learner = learner_name(writer)
    name = runs.model_name(learner)
    with ledger_session(engine) as session:
        learner_id = configure_learner(session, learner, "simplecil", "tiny", {}).id
    with learner_lease(engine, learner_id, process_holder(learner), timedelta(minutes=5)):
        with ledger_session(engine) as session:
            row = configure_learner(session, learner, "simplecil", "tiny", {})
            fail_interrupted_increments(session, row)
            history = learned_tasks(session, row)
            (version,) = pending_versions(session, row)
            version_id, classes = version.id, sorted(version.classes)
            data = runs.DataInput(
                uri=str(settings.workspace / version.path),
                name=version.batch_id,
                md5=version.md5,
                git_rev=version.git_rev,
            )
        task_index = len(history)
        runs.end_interrupted_runs(client, learner)
        if task_index == 0:
            client.create_registered_model(name)  # in the flow, registering the first pyfunc creates it

        def learned() -> IncrementRecord:
            figures = figures_after(task_index)
            candidate = promotion.CandidateFigures(
                row=[ACCURACY] * (task_index + 1), test_sizes=figures.test_sizes, accuracy=ACCURACY
            )
            champion = promotion.champion_figures(client, name, history)
            return IncrementRecord(
                task_index=task_index,
                data=data,
                new_classes=classes,
                first_class_id=task_index * CLASSES_PER_ROUND,
                history=history,
                params=PARAMS,
                row=candidate.row,
                figures=figures,
                losses=LOSSES,
                decision=promotion.decide(promotion.GateConfig(), candidate, champion),
                report=[],
                model=runs.ModelPackage(state_dir=state_dir, class_names=classes, image_size=IMAGE_SIZE, weights=None),
            )

        with runs.learn_run(client, settings, learner, {"strata.writer": str(writer)}) as parent_run_id:
            scope = RecorderScope(learner=learner, learner_id=learner_id, parent_run_id=parent_run_id, flow_run_id="")
            recorder = IncrementRecorder(settings, scope, functools.partial(register_state, client))
            recorder.record(task_index, version_id, learned)


class Problems(logging.Handler):
    """Warnings and errors that Strata, MLflow or SQLAlchemy log in a writer: what a user would see."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}"[:2000])


def writer_process(
    writer: int, rounds: int, workspace: str, ledger_url: str, tracking_uri: str, barrier: Any, results: Any
) -> None:
    """One writer: wait, first use of the stores, wait, ``rounds`` rounds; report what went wrong."""
    problems = Problems()
    for logger in ("", "mlflow"):  # MLflow's loggers do not propagate to the root
        logging.getLogger(logger).addHandler(problems)
    errors: list[str] = []
    settings = load_settings(workspace, ledger_url=ledger_url, mlflow_tracking_uri=tracking_uri)
    state_dir = settings.state_dir / "increments" / learner_name(writer) / "state"  # logged as the run's artifacts
    state_dir.mkdir(parents=True)
    (state_dir / "state.json").write_text('{"prototypes": []}')
    engine = migrate.migrated_engine(ledger_url)
    client = None
    timings = {}
    try:
        barrier.wait(START_TIMEOUT_S)
        started = time.perf_counter()
        try:
            client = runs.configure(settings)
        except Exception:
            errors.append(traceback.format_exc())
        timings["first_use_s"] = time.perf_counter() - started
        barrier.wait(START_TIMEOUT_S)
        started = time.perf_counter()
        slowest = 0.0
        for round_index in range(rounds if client is not None else 0):
            round_started = time.perf_counter()
            try:
                classes = [f"w{writer}r{round_index}c{c}" for c in range(CLASSES_PER_ROUND)]
                record_version(engine, settings, learner_name(writer), batch_id(writer, round_index), classes)
                learn_round(engine, client, settings, writer, state_dir)
            except Exception:  # a failed learn stops there, as the flow does
                errors.append(traceback.format_exc())
                break
            slowest = max(slowest, time.perf_counter() - round_started)
        timings["rounds_s"] = time.perf_counter() - started
        timings["slowest_round_s"] = slowest
    except Exception:
        errors.append(traceback.format_exc())
    finally:
        engine.dispose()
        results.put({"writer": writer, "errors": errors, "logged": problems.messages, **timings})


def expected_counts(writers: int, rounds: int) -> dict[str, dict[str, int]]:
    """What the stores hold once every round of every writer succeeded."""
    total = writers * rounds
    return {
        "ledger": {
            "learners": writers,
            "data_versions": total,
            "succeeded_increments": total,
            "other_increments": 0,
            "classes": total * CLASSES_PER_ROUND,
            "promotions": total,
            "leases_left": 0,
        },
        "mlflow": {
            "experiments": writers,
            "finished_runs": 2 * total,
            "params": total * len(runs.flatten("", PARAMS.model_dump(mode="json"))),
            "metric_points": total * (CHILD_METRICS + PARENT_METRICS),
            "strata_tags": total * (CHILD_TAGS + PARENT_TAGS),
            "dataset_inputs": total,
            "registered_models": writers,
            "model_versions": total,
            "aliases_on_last_version": 2 * writers,
        },
    }


def ledger_counts(ledger_url: str) -> dict[str, int]:
    engine = migrate.migrated_engine(ledger_url)
    try:
        with ledger_session(engine) as session:

            def count(model, *where) -> int:
                return session.scalar(select(func.count()).select_from(model).where(*where))

            return {
                "learners": count(Learner, Learner.name.like("writer-%")),
                "data_versions": count(DataVersion),
                "succeeded_increments": count(Increment, Increment.status == "succeeded"),
                "other_increments": count(Increment, Increment.status != "succeeded"),
                "classes": count(LearnedClass),
                "promotions": count(Promotion),
                "leases_left": count(Lease),
            }
    finally:
        engine.dispose()


def mlflow_counts(tracking_uri: str, writers: int, rounds: int) -> dict[str, int]:
    """Everything read back through MLflow's client, as a user of the store would see it."""
    client = MlflowClient(tracking_uri, tracking_uri)
    counts = dict.fromkeys(expected_counts(writers, rounds)["mlflow"], 0)
    experiments = [e for e in client.search_experiments() if e.name.startswith("strata/writer-")]
    counts["experiments"] = len(experiments)
    found = client.search_runs([e.experiment_id for e in experiments], max_results=50000) if experiments else []
    for run in found:
        counts["finished_runs"] += run.info.status == "FINISHED"
        counts["params"] += len(run.data.params)
        counts["metric_points"] += sum(len(client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics)
        counts["strata_tags"] += sum(key.startswith("strata.") for key in run.data.tags)
        counts["dataset_inputs"] += len(run.inputs.dataset_inputs) if run.inputs else 0
    for writer in range(writers):
        name = runs.model_name(learner_name(writer))
        models = client.search_registered_models(f"name = '{name}'")
        if not models:
            continue
        counts["registered_models"] += 1
        versions = client.search_model_versions(f"name = '{name}'")
        counts["model_versions"] += len(versions)
        last = str(max((int(v.version) for v in versions), default=0))
        aliases = client.get_registered_model(name).aliases
        counts["aliases_on_last_version"] += sum(str(version) == last for version in aliases.values())
    return counts


@contextmanager
def postgres_databases(server: str, kinds: tuple[str, ...]) -> Iterator[list[str]]:
    """Fresh databases on ``server``, one per kind, dropped afterwards."""
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    names = [f"strata_writers_{uuid.uuid4().hex[:8]}_{kind}" for kind in kinds]
    try:
        with admin.connect() as connection:
            for name in names:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield [make_url(server).set(database=name).render_as_string(hide_password=False) for name in names]
    finally:
        with admin.connect() as connection:
            for name in names:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run_writers(writers: int, rounds: int, workspace: Path, ledger_url: str, tracking_uri: str) -> dict[str, Any]:
    """Start the writers together, time both phases, and gather what each reports."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(writers + 1), context.Queue()
    processes = [
        context.Process(
            target=writer_process, args=(n, rounds, str(workspace), ledger_url, tracking_uri, barrier, results)
        )
        for n in range(writers)
    ]
    for process in processes:
        process.start()
    reports, phases, errors = [], {}, []
    try:
        barrier.wait(START_TIMEOUT_S)
        started = time.perf_counter()
        barrier.wait(START_TIMEOUT_S)
        phases["first_use_s"] = time.perf_counter() - started
        started = time.perf_counter()
        reports = [results.get(timeout=ROUNDS_TIMEOUT_S) for _ in processes]
        phases["rounds_s"] = time.perf_counter() - started
    except (threading.BrokenBarrierError, queue.Empty) as exc:  # a writer that died or hung
        errors.append(f"the writers did not all finish: {type(exc).__name__} {exc}")
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
            process.join()
        if process.exitcode != 0:
            errors.append(f"writer process {process.pid} exited with code {process.exitcode}")
    for report in sorted(reports, key=lambda r: r["writer"]):
        errors += [f"writer {report['writer']}: {error}" for error in report["errors"]]
    return {
        "phases": phases,
        "errors": errors,
        "logged": [m for r in reports for m in r["logged"]],
        "writers": {
            r["writer"]: {k: round(r[k], 3) for k in ("first_use_s", "rounds_s", "slowest_round_s") if k in r}
            for r in reports
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="ingest + learn rounds per writer")
    parser.add_argument(
        "--server",
        default=POSTGRES_SERVER,
        help="PostgreSQL server (SQLAlchemy URL) on which to create two scratch databases",
    )
    parser.add_argument("--ledger-url", help="an empty database for the ledger instead of a scratch one")
    parser.add_argument("--tracking-uri", help="an empty database for MLflow instead of a scratch one")
    args = parser.parse_args(argv)
    from benchmarks import common  # here, not at the top: it imports torch, which the writers do not need

    started = time.perf_counter()
    with ExitStack() as stack:
        workspace = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="strata-writers-")))
        ledger_url, tracking_uri = args.ledger_url, args.tracking_uri
        if args.backend == "sqlite":
            ledger_url = ledger_url or f"sqlite:///{workspace / '.strata' / 'strata.db'}"
            tracking_uri = tracking_uri or f"sqlite:///{workspace / '.strata' / 'mlflow.db'}"
        elif not (ledger_url and tracking_uri):
            ledger_url, tracking_uri = stack.enter_context(postgres_databases(args.server, ("ledger", "mlflow")))
        migrate.upgrade(ledger_url)
        outcome = run_writers(args.writers, args.rounds, workspace, ledger_url, tracking_uri)
        expected = expected_counts(args.writers, args.rounds)
        found = {}
        for store, count in (
            ("ledger", lambda: ledger_counts(ledger_url)),
            ("mlflow", lambda: mlflow_counts(tracking_uri, args.writers, args.rounds)),
        ):
            try:
                found[store] = count()
            except Exception as exc:  # a store the writers broke is a finding, not a crash of the benchmark
                outcome["errors"].append(f"reading the {store} store back failed: {type(exc).__name__}: {exc}")
                found[store] = dict.fromkeys(expected[store], 0)
    stored = sum(value for counts in found.values() for key, value in counts.items() if key not in LEFTOVERS)
    first_use_s, rounds_s = outcome["phases"].get("first_use_s"), outcome["phases"].get("rounds_s")
    document = {
        "benchmark": "concurrent_writers",
        "backend": args.backend,
        "writers": args.writers,
        "rounds": args.rounds,
        "ledger_url": redact_url(ledger_url),
        "tracking_uri": redact_url(tracking_uri),
        "first_use_s": round(first_use_s, 3) if first_use_s else None,
        "rounds_s": round(rounds_s, 3) if rounds_s else None,
        "writes": stored,
        "writes_per_s": round(stored / rounds_s, 1) if rounds_s else None,
        "rounds_per_s": round(args.writers * args.rounds / rounds_s, 2) if rounds_s else None,
        "slowest_round_s": max((w.get("slowest_round_s", 0.0) for w in outcome["writers"].values()), default=None),
        "counts": {
            store: {key: {"expected": value, "found": found[store][key]} for key, value in counts.items()}
            for store, counts in expected.items()
        },
        "lost_writes": sum(
            max(value - found[store][key], 0) for store, counts in expected.items() for key, value in counts.items()
        ),
        "error_count": len(outcome["errors"]),
        "errors": outcome["errors"],
        "database_locked_logged": sum("database is locked" in m for m in outcome["logged"]),
        "logged": outcome["logged"],
        "per_writer": outcome["writers"],
        "wall_s": round(time.perf_counter() - started, 3),
        "machine": common.machine(),
    }
    common.emit(document)
    return document


if __name__ == "__main__":
    main()
