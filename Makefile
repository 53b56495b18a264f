# The two commands of the README:  `make demo`  and  `make test`.
# Both create (or reuse) a virtual environment in .venv with only python3 needed up front.
# `make corgie-check` runs the shipped modules through corgie in a separate .venv-corgie.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test isbi isbi-sstem isbi-data isbi-train lint clean corgie-check

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m metroem.demo_pipeline $(ARGS)

# The real-data recipe of models/isbi: ISBI ssTEM sections -> CloudVolume -> h5, plus the FIB-SEM
# blocks' neighbour pairs (known zero field, 10 nm slices resampled to each stage's pixel size,
# the last 50 slices of each block held out) -> train.py. ISBI sections 0,1,14,15,28,29 are held
# out (the quality benchmark's pairs). ~25 min on 2 CPU cores. `make isbi-sstem` is the same
# recipe on the ISBI pairs alone (the earlier shipped weights; docs/experiments.md compares them).
ISBI ?= ../shared/data/isbi
FIBSEM ?= ../shared/data/fibsem
RUN ?= runs/isbi
isbi: $(STAMP)
	$(MAKE) --no-print-directory isbi-data RUN=$(RUN)
	$(PY) -m metroem.cli registered --dst_folder $(RUN)/data --blocks $(FIBSEM) --block_nm 10 \
	    --resolution_nm 4 --mips 0 1 2 --gaps 1 2 4 --z_step 24 -q
	$(MAKE) --no-print-directory isbi-train RUN=$(RUN)

isbi-sstem: $(STAMP)
	$(MAKE) --no-print-directory isbi-data RUN=$(RUN)
	$(MAKE) --no-print-directory isbi-train RUN=$(RUN)

isbi-data: $(STAMP)
	$(PY) -m metroem.cli ingest $(ISBI) $(RUN)/volume --num_mips 3 --exclude 0,1,14,15,28,29 --overwrite
	rm -rf $(RUN)/data
	$(PY) download_image.py --cv_path $(RUN)/volume --dst_folder $(RUN)/data --z_start 1 --z_end 24 \
	    --x_offset 256 --y_offset 256 --mips 0 1 2 --patch_sizes 512 256 128 --overwrite

isbi-train: $(STAMP)
	rm -rf $(RUN)/pyramid
	$(PY) -m metroem.cli pretrained copy isbi $(RUN)/pyramid
	# models/isbi/train.yaml is the whole recipe (model.train_spec: refinements off while training)
	$(PY) train.py --pyramid_path $(RUN)/pyramid --dataset_path $(RUN)/data --checkpoint_name isbi \
	    --seed 0 $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(ARGS)

# corgie (0.1.1 pins click<8) gets its own environment. Naming torch==2.13.0 next to corgie keeps
# the pinned CPU build: pip then picks the matching torchvision (0.28.0) instead of replacing
# torch with a newer CUDA build. tests/test_corgie.py runs `corgie align-block` and
# `corgie compute-field` with models/demo's module folders as processors (~35 s on one core).
CORGIE_VENV := .venv-corgie
CORGIE_PY := $(CORGIE_VENV)/bin/python
CORGIE_STAMP := $(CORGIE_VENV)/.installed

$(CORGIE_STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(CORGIE_VENV)
	$(CORGIE_PY) -m pip install -q --upgrade pip
	$(CORGIE_PY) -m pip install -q torch==2.13.0
	$(CORGIE_PY) -m pip install -q -e . pytest
	$(CORGIE_PY) -m pip install -q corgie==0.1.1 torch==2.13.0
	$(CORGIE_PY) -m pip check
	touch $(CORGIE_STAMP)

corgie-check: $(CORGIE_STAMP)
	OMP_NUM_THREADS=1 $(CORGIE_PY) -m pytest -q tests/test_corgie.py $(ARGS)

clean:
	rm -rf $(VENV) $(CORGIE_VENV) demo_output
