# The two set-up commands of the README: `make demo` and `make test`. Both create .venv and install
# what they need; the stamp file re-installs when pyproject.toml changes. `make lint` is CI's style
# and type check.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-10)
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export MPLBACKEND := Agg
# The machine's pip configuration points at local file indexes that print one warning per package.
QUIET_PIP := { grep -v "^WARNING: Location 'file:" || true; }
LINTED := cli flows tasks models migrations tests benchmarks

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, timm, prefect, mlflow, dvc, onnxruntime"
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/strata demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# ruff over the product code, its tests and benchmarks; mypy over the product code. All three run,
# so one pass shows every problem; the target fails when any of them does.
lint: $(STAMP)
	status=0; \
	$(VENV)/bin/ruff check $(LINTED) || status=1; \
	$(VENV)/bin/ruff format --check $(LINTED) || status=1; \
	VENV=$(VENV) .ci/typecheck || status=1; \
	exit $$status

clean:
	rm -rf $(VENV) runs .pytest_cache build/typecheck
