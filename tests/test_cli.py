"""The `strata` CLI end to end on scikit-learn's digits with the tiny backbone."""

import json

import pytest
from typer.testing import CliRunner

from strata.cli.app import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("benchmark", "methods"):
        assert command in result.output


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    results = {}
    for method in ("simplecil", "finetune"):
        result = runner.invoke(
            app,
            [
                "benchmark",
                "--dataset",
                "digits",
                "--method",
                method,
                "--base",
                "0",
                "--increment",
                "2",
                "--backbone",
                "tiny",
                "--epochs",
                "3",
                "--quiet",
                "--out",
                str(out / method),
            ],
        )
        assert result.exit_code == 0, result.output
        results[method] = (result.output, json.loads((out / method / "metrics.json").read_text()), out / method)
    return results


def test_benchmark_writes_metrics_and_plots(digits_runs):
    output, metrics, folder = digits_runs["simplecil"]
    assert "RANDOMLY INITIALISED" in output and "forgetting" in output
    assert len(metrics["accuracy_matrix"]) == 5 and len(metrics["accuracy"]) == 5
    assert metrics["backbone"]["random_init"] is True
    assert len(metrics["confusion_matrix"]) == 10
    for name in ("accuracy_curve.png", "accuracy_matrix.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetune_forgets_more_than_simplecil(digits_runs):
    simplecil = digits_runs["simplecil"][1]["final_forgetting"]
    finetune = digits_runs["finetune"][1]["final_forgetting"]
    assert finetune > simplecil + 0.2, (finetune, simplecil)


def test_unknown_method_lists_valid_ones(tmp_path):
    result = runner.invoke(app, ["benchmark", "--method", "icarl", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown method 'icarl'" in result.output and "simplecil" in result.output


def test_unknown_dataset_and_backbone(tmp_path):
    result = runner.invoke(app, ["benchmark", "--dataset", "imagenet", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown dataset 'imagenet'" in result.output
    result = runner.invoke(app, ["benchmark", "--backbone", "vit_huge_thing", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown backbone" in result.output


def test_too_few_classes_is_a_clear_error(tmp_path):
    result = runner.invoke(
        app, ["benchmark", "--dataset", "synthetic:4", "--base", "3", "--increment", "2", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "needs at least 5 classes" in result.output


def test_methods_command():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0 and "simplecil" in result.output


def test_profile_sets_protocol_and_cli_options_win(tmp_path):
    from strata.tasks.benchmarking.profiles import profile_params

    assert profile_params("simplecil-cifar100")["increment"] == 5
    result = runner.invoke(
        app,
        [
            "benchmark",
            "--profile",
            "simplecil-cifar100",
            "--dataset",
            "synthetic:6",
            "--backbone",
            "tiny",
            "--increment",
            "3",
            "--quiet",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["protocol"] == "B0-Inc3" and metrics["method"] == "simplecil"
    result = runner.invoke(app, ["benchmark", "--profile", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown profile 'nope'" in result.output
    assert "simplecil-cifar100" in runner.invoke(app, ["profiles"]).output


def test_compare_flow_runs_methods_on_one_stream_with_one_mlflow_run_each(tmp_path, prefect_server):
    from mlflow import MlflowClient

    result = runner.invoke(
        app,
        [
            "compare",
            "--methods",
            "simplecil,finetune_head",
            "--dataset",
            "synthetic:6",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--workspace",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "simplecil" in result.output and "finetune_head" in result.output
    uri = f"sqlite:///{tmp_path}/.strata/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("strata/benchmark/synthetic-B0-Inc2")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["strata.method"] for r in runs) == ["finetune_head", "simplecil"]
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "accuracy")) == [0, 1, 2]


def test_compare_fans_out_over_a_dask_local_cluster_with_the_sequential_metrics(tmp_path, prefect_server):
    """Methods × seeds on 2 Dask worker processes give exactly the sequential run's accuracy matrices."""
    from strata.flows.benchmark import CompareParams
    from strata.flows.benchmark import benchmark as compare

    common = dict(
        methods=["simplecil", "finetune_head"],
        seeds=[1993, 7],
        dataset="synthetic:6",
        epochs=1,
        workspace=str(tmp_path),
    )
    sequential = compare(CompareParams(out=tmp_path / "sequential", **common))
    fanned_out = compare(CompareParams(out=tmp_path / "dask", dask_workers=2, **common))
    assert [(r["method"], r["seed"]) for r in fanned_out] == [
        ("simplecil", 1993),
        ("simplecil", 7),
        ("finetune_head", 1993),
        ("finetune_head", 7),
    ]
    assert fanned_out == sequential
    for method in common["methods"]:
        for seed in common["seeds"]:
            ours = json.loads((tmp_path / "dask" / method / f"seed-{seed}" / "metrics.json").read_text())
            theirs = json.loads((tmp_path / "sequential" / method / f"seed-{seed}" / "metrics.json").read_text())
            assert ours["accuracy_matrix"] == theirs["accuracy_matrix"] and ours["class_order"] == theirs["class_order"]
            flat = [loss for task in theirs["train_losses"] for loss in task]
            assert [loss for task in ours["train_losses"] for loss in task] == pytest.approx(flat, rel=1e-5)
