# Two commands for a new user: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch is pinned through constraints.txt so pip takes the CPU wheel instead of a multi-GB CUDA build;
# with your own CUDA torch already installed, run `make install CONSTRAINTS=` to keep it.
CONSTRAINTS ?= constraints.txt
PIP_C  := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
SPACE  ?= search_spaces/smoke.yaml
export RAY_AUTH_MODE ?= disabled
# The corpus cache and the fused kernel's C++ build stay in the checkout (as in .ci/run), not in
# ~/.cache/nlstm: `make install` builds the C++ loops there once and `make test`/`make demo` load them.
export NLSTM_CACHE_DIR ?= $(CURDIR)/.cache/nlstm

.PHONY: install demo test lint bench ui clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_C) torch
	$(PY) -m pip install -q $(PIP_C) -e ".[dev]"
	@# Compile the fused kernel's C++ loops now (15-60 s, once per machine and torch), not inside the first
	@# study's wall time; without a compiler this prints one warning and the Python loops run instead.
	$(PY) -c "import nlstm.fused.cpp as cpp; print('C++ loops:', 'ready' if cpp.prepare() else 'unavailable (Python loops)')"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) study/run.py --space $(SPACE)

test: $(STAMP)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; } || echo "no chromium: the report rendering test will be skipped"
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check nlstm study dashboards tests benchmarks

# The MLflow UI on the study store, on 127.0.0.1 only: `make ui [STUDY=name] [STORE=uri] [UI_HOST=...] [UI_PORT=...]`.
ui: $(STAMP)
	$(PY) study/ui.py $(if $(STUDY),--study $(STUDY)) $(if $(STORE),--tracking-uri $(STORE)) --host $(or $(UI_HOST),127.0.0.1) --port $(or $(UI_PORT),5000)

bench: $(STAMP)
	$(PY) benchmarks/throughput.py --compare-loops

clean:
	rm -rf runs studies mlflow.db ray_results .pytest_cache
