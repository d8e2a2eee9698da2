"""Times each method's official code on the same machine and config as Strata: ``STRATA_OFFICIAL_<CODEBASE>``.

The official code is never part of this repository. ``STRATA_OFFICIAL_LAE``, ``STRATA_OFFICIAL_APER`` and
``STRATA_OFFICIAL_OVOR`` name checkouts of gqk/LAE, zhoudw-zdw/RevisitingCIL and jpmorganchase/ovor; a
method whose variable is unset is skipped with a message saying what to set. Each code base pins an older
timm (and a few packages of its time) than Strata's, so its driver (``benchmarks/official_drivers/``) runs
in a separate interpreter, this one's, with those pins installed once into a package overlay
(``pip install --no-deps --target``, kept under ``$STRATA_OFFICIAL_PACKAGES`` or
``~/.cache/strata/official-packages``) in front of ``sys.path``. The drivers run one code base's own model,
optimizer and training step on the same synthetic batches as Strata's benchmark and print one JSON line;
the ratio Strata / official is the figure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.official_drivers.official_runtime import CONFIGS

DRIVERS = Path(__file__).with_name("official_drivers")


@dataclass(frozen=True)
class Codebase:
    variable: str
    repository: str
    driver: str
    packages: tuple[str, ...]  # the code base's pins that differ from Strata's environment, installed without deps


CODEBASES = {
    "lae": Codebase(
        "STRATA_OFFICIAL_LAE",
        "gqk/LAE",
        "official_lae.py",
        ("timm==0.5.4", "torchmetrics==0.10.2", "absl-py==1.3.0", "torchinfo==1.7.1"),
    ),
    "aper": Codebase(
        "STRATA_OFFICIAL_APER", "zhoudw-zdw/RevisitingCIL", "official_aper.py", ("timm==0.6.12", "easydict==1.14")
    ),
    "ovor": Codebase(
        "STRATA_OFFICIAL_OVOR", "jpmorganchase/ovor", "official_ovor.py", ("timm==0.4.12", "faiss-cpu==1.15.1")
    ),
}


def codebase_of(method: str) -> str | None:
    """Which official code base implements ``method`` (Strata's registry name)."""
    if method.startswith("lae_"):
        return "lae"
    if method == "simplecil" or method.startswith("aper_"):
        return "aper"
    return "ovor" if method == "ovor" else None


def overlay_folder(codebase: Codebase) -> Path:
    """Where the code base's pinned packages live; the name changes with the pins."""
    root = Path(os.environ.get("STRATA_OFFICIAL_PACKAGES") or Path.home() / ".cache" / "strata" / "official-packages")
    digest = hashlib.sha256("\n".join(codebase.packages).encode()).hexdigest()[:12]
    return root / f"{codebase.driver.removesuffix('.py')}-{digest}"


def package_overlay(codebase: Codebase) -> Path:
    """The overlay folder, its packages installed on first use (atomically: a failed install leaves none)."""
    target = overlay_folder(codebase)
    if target.is_dir():
        return target
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".installing-", dir=root))
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-compile",
                "--target",
                str(staging),
                *codebase.packages,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        staging.rename(target)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"could not install {' '.join(codebase.packages)}: {exc.stderr.strip()[-500:]}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def run_driver(method: str, checkout: str, codebase: Codebase, config: dict) -> dict:
    """The official step's figures for ``method``, from its driver in a fresh interpreter."""
    overlay = package_overlay(codebase)
    command = [
        sys.executable,
        "-W",
        "ignore",
        str(DRIVERS / codebase.driver),
        "--checkout",
        checkout,
        "--method",
        method,
        "--backbone",
        config["backbone"],
        "--batch-size",
        str(config["batch_size"]),
        "--steps",
        str(config["steps"]),
        "--epochs",
        str(config["epochs"]),
        "--classes-per-task",
        str(config["classes_per_task"]),
        "--threads",
        str(torch.get_num_threads()),
    ]
    environment = {**os.environ, "PYTHONPATH": str(overlay), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the {codebase.repository} driver failed: {result.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


def measure(method: str, config: dict) -> dict:
    """One run of ``method``'s official step: its figures, or why there are none (skipped, failed)."""
    name = codebase_of(method)
    if name is None:
        return {"status": "skipped", "reason": "no official code base for this method"}
    codebase = CODEBASES[name]
    checkout = os.environ.get(codebase.variable)
    if not checkout:
        return {"status": "skipped", "reason": f"set {codebase.variable}=/path/to/a/{codebase.repository} checkout"}
    if config["backbone"] not in CONFIGS:
        return {"status": "skipped", "reason": f"the drivers build {' and '.join(CONFIGS)} only"}
    try:
        return {"status": "measured", "official": run_driver(method, checkout, codebase, config)}
    except (RuntimeError, json.JSONDecodeError) as exc:
        return {"status": "failed", "error": str(exc)}


def summarise(official_runs: list[dict], strata_runs: list[dict]) -> dict:
    """Medians over interleaved repeats: official images/s per step and the median Strata / official ratio.

    Each repeat times Strata's step and then the official one, so a slow spell of the machine hits both
    sides of a ratio; the median of the per-repeat ratios is the figure to read.
    """
    unmeasured = next((run for run in official_runs if run["status"] != "measured"), None)
    if unmeasured is not None:
        return unmeasured
    first = official_runs[0]
    result = {
        "status": "measured",
        "codebase": first["official"]["codebase"],
        "commit": first["official"]["commit"],
        "timm": first["official"]["timm"],
        "official": {},
        "strata_vs_official": {},
    }
    for key in ("task_0", "task_t"):
        theirs = [run["official"][key]["images_per_s"] for run in official_runs]
        ours = [run[key]["images_per_s"] for run in strata_runs]
        result["official"][key] = {
            "kind": first["official"][key]["kind"],
            "images_per_s": statistics.median(theirs),
            "per_repeat": theirs,
        }
        result["strata_vs_official"][key] = statistics.median(
            common.ratio(a, b) for a, b in zip(ours, theirs, strict=True)
        )
    return result
