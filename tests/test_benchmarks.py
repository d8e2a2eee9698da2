"""The benchmark scripts run with tiny settings and print one JSON document with the expected keys.

No timing is asserted: figures depend on the machine and its load.
"""

import json

import pytest

from benchmarks import cost_growth, feature_reuse, inference_throughput, official, train_throughput

RUNS = {
    "train_throughput": (
        train_throughput,
        ["--methods", "simplecil", "lae_prefix", "--batch-size", "4", "--steps", "1", "--epochs", "1"],
    ),
    "inference_throughput": (inference_throughput, ["--methods", "lae_adapter", "--batch-size", "2", "--repeats", "1"]),
    "cost_growth": (
        cost_growth,
        [
            "--methods",
            "simplecil",
            "ovor",
            "--tasks",
            "2",
            "--images-per-task",
            "8",
            "--batch-size",
            "4",
            "--repeats",
            "1",
        ],
    ),
    "feature_reuse": (feature_reuse, ["--images", "8", "--methods", "simplecil", "aper_adapter"]),
}


@pytest.mark.parametrize("name", RUNS)
def test_script_prints_json_with_baseline_and_ratios(name, capsys, monkeypatch):
    for codebase in official.CODEBASES.values():
        monkeypatch.delenv(codebase.variable, raising=False)
    module, argv = RUNS[name]
    module.main(argv)
    document = json.loads(capsys.readouterr().out)
    assert document["benchmark"] == name
    assert document["machine"]["cpu_count"] >= 1
    methods = document["methods"]
    if name == "train_throughput":
        assert document["baseline"]["images_per_s"] > 0
        assert set(methods["lae_prefix"]) == {"task_0", "task_t"}
        assert methods["lae_prefix"]["task_t"]["kind"] == "train"
        assert methods["simplecil"]["task_0"]["kind"] == "prototypes"
        assert "vs_baseline" in methods["lae_prefix"]["task_0"]
        assert document["official"]["lae_prefix"] == {
            "status": "skipped",
            "reason": "set STRATA_OFFICIAL_LAE=/path/to/a/gqk/LAE checkout",
        }
        assert document["official"]["simplecil"]["status"] == "skipped"
    elif name == "inference_throughput":
        figures = methods["lae_adapter"]["batch_1"]
        assert {"torch_images_per_s", "onnxruntime_images_per_s", "ort_vs_torch_latency", "torch_vs_simplecil"} <= set(
            figures
        )
        assert methods["simplecil"]["batch_2"]["torch_vs_simplecil"] == 1.0
    elif name == "cost_growth":
        assert [row["task"] for row in methods["ovor"]["tasks"]] == [1, 2]
        assert methods["simplecil"]["tasks"][1]["state_bytes"] > methods["simplecil"]["tasks"][0]["state_bytes"]
        assert {"last_vs_first", "last_vs_second"} == set(methods["ovor"]["train_s"])
    else:
        assert document["baseline"]["forwards"] == 8
        assert methods["simplecil"]["first_run_forwards"] == 8
        assert methods["aper_adapter"]["first_run_forwards"] == 16  # two branches
        assert methods["simplecil"]["second_run_forwards"] == methods["aper_adapter"]["second_run_forwards"] == 0


def test_official_driver_failure_is_reported_with_its_error(tmp_path, monkeypatch):
    """A driver that cannot run (here: its package overlay lacks the code base's timm) reports why."""
    codebase = official.CODEBASES["ovor"]
    monkeypatch.setenv(codebase.variable, str(tmp_path / "checkout"))
    monkeypatch.setenv("STRATA_OFFICIAL_PACKAGES", str(tmp_path / "packages"))
    official.overlay_folder(codebase).mkdir(parents=True)  # present, so nothing is installed
    config = {"backbone": "tiny", "batch_size": 2, "steps": 1, "epochs": 1, "classes_per_task": 2}
    assert official.measure("linear", config) == {
        "status": "skipped",
        "reason": "no official code base for this method",
    }
    failed = official.measure("ovor", config)
    assert failed["status"] == "failed"
    assert "the overlay is not in front of sys.path: timm 1." in failed["error"]
    assert official.summarise([failed], [{}]) == failed


def test_official_repeats_are_summarised_as_medians_of_interleaved_ratios():
    step = {"codebase": "c", "commit": "x", "timm": "0.4.12"}
    theirs = [
        {
            "status": "measured",
            "official": {
                **step,
                "task_0": {"kind": "train", "images_per_s": rate},
                "task_t": {"kind": "train", "images_per_s": rate},
            },
        }
        for rate in (100.0, 50.0, 200.0)
    ]
    ours = [{"task_0": {"images_per_s": rate}, "task_t": {"images_per_s": rate}} for rate in (110.0, 60.0, 180.0)]
    summary = official.summarise(theirs, ours)
    assert summary["official"]["task_0"]["images_per_s"] == 100.0
    assert summary["strata_vs_official"]["task_0"] == 1.1  # ratios 1.1, 1.2, 0.9
