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
	$(PY) -m metroem.cli pretrained copy isbi $(RUN)/pyramid
	# models/isbi/train.yaml is the whole recipe (model.train_spec: refinements off while training)
	$(PY) train.py --pyramid_path $(RUN)/pyramid --dataset_path $(RUN)/data --checkpoint_name isbi \
	    --seed 0 $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) demo_output
