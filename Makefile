# Two commands on a fresh machine: `make demo` (the whole factory, offline smoke preset) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
# A CPU build of torch first, so that resolving the project does not pull a multi-GB CUDA build.
# On a GPU machine install the CUDA build of torch into the venv before `make install`.
TORCH_SPEC ?= torch==2.13.0
WHEELS_OPT := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# loadgroup: tests marked xdist_group("ray") share one worker and so one Ray cluster (tests/conftest.py).
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: install demo test bench clean-demo lock

# constraints.txt: the one set of versions the demo, the tests, CI and the docker images install.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(WHEELS_OPT) "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check $(WHEELS_OPT) -c constraints.txt -e ".[dev]"
	touch $@

# Raise the pins (a commit of its own, with `make test` run on it): the newest versions pyproject.toml
# allows, resolved in a scratch venv, written to constraints.txt under its header.
LOCK_VENV ?= .lock-venv
lock:
	rm -rf $(LOCK_VENV) && python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --disable-pip-version-check $(WHEELS_OPT) "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/pip install -q --disable-pip-version-check $(WHEELS_OPT) -e ".[dev]" psycopg2-binary
	{ sed -n '/^#/p' constraints.txt; $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v '^torch==' | tr 'A-Z_' 'a-z-'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf $(LOCK_VENV)

install: $(VENV)/.installed

# One torch thread: the demo's models are small, and on two shared cores a second thread contends
# with the other work (training 30 LoRA steps: 27-31 s with one thread, 60-82 s with two, load ~6).
DEMO_THREADS ?= 1

demo: install
	OMP_NUM_THREADS=$(DEMO_THREADS) $(VENV)/bin/dermt2im run --config smoke --workdir $(WORKDIR)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/preprocess.py
	$(PY) bench/train.py
	$(PY) bench/generate.py

clean-demo:
	rm -rf $(WORKDIR)
