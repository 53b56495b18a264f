# The two commands of the README:  `make demo`  and  `make test`.
# Both create (or reuse) a virtual environment in .venv with only python3 needed up front.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test isbi lint clean

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

clean:
	rm -rf $(VENV) demo_output
