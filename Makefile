# The two commands of the README:  `make demo`  and  `make test`.
# Both create (or reuse) a virtual environment in .venv with only python3 needed up front.
# `make corgie-check` runs the shipped modules through corgie in a separate .venv-corgie.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test isbi lint clean corgie-check

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

# The real-data recipe of models/isbi: ISBI ssTEM sections -> CloudVolume -> h5 -> train.py.
# Sections 0,1,14,15,28,29 are held out (the quality benchmark's pairs). ~35-50 min on 2 CPU cores.
ISBI ?= ../shared/data/isbi
RUN ?= runs/isbi
isbi: $(STAMP)
	$(PY) -m metroem.cli ingest $(ISBI) $(RUN)/volume --num_mips 3 --exclude 0,1,14,15,28,29 --overwrite
	$(PY) download_image.py --cv_path $(RUN)/volume --dst_folder $(RUN)/data --z_start 1 --z_end 24 \
	    --x_offset 256 --y_offset 256 --mips 0 1 2 --patch_sizes 512 256 128 --overwrite
	rm -rf $(RUN)/pyramid
	$(PY) -c "from metroem.demo_pipeline import copy_pyramid_definition as c; c('models/isbi', '$(RUN)/pyramid')"
	# the shipped weights were trained with the parameter-free refinements off, then switched on
	# (every stage then runs twice: iterations=2)
	# (and stage 0's three coarsest levels get a wider residual blur: level_smooth_sigma)
	$(PY) -c "from metroem import modules as m; from metroem.nets import REFINEMENTS_OFF as off; [m.update_spec(x.path, **off) for x in m.discover('$(RUN)/pyramid')]"
	$(PY) train.py --pyramid_path $(RUN)/pyramid --dataset_path $(RUN)/data --checkpoint_name isbi \
	    --train_mode custom --train_params_path models/isbi/train.yaml --seed 0 $(ARGS)
	$(PY) -c "from metroem import modules as m; [m.update_spec(x.path, lk_iterations=1, lk_sigma=8.0, residual_sigma=12.0, iterations=2) for x in m.discover('$(RUN)/pyramid')]"
	$(PY) -c "from metroem import modules as m; m.update_spec(m.discover('$(RUN)/pyramid')[0].path, level_smooth_sigma=[1.0, 1.0, 3.0, 3.0, 3.0])"

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
