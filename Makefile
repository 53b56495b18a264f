# The two commands of the README:  `make demo`  and  `make test`.
# Both create (or reuse) a virtual environment in .venv with only python3 needed up front.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# artificery declares a torch requirement that would replace the pinned build.
	$(PY) -m pip install -q --no-deps artificery==0.0.3.3
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m metroem.demo_pipeline $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) demo_output
