# The two commands: `make demo` and `make test`. Both create/reuse .venv and install what they need
# (eva-repro with its test and docs extras).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-gpu demo bench lint docs venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,docs]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --timeout=900 tests
	$(MAKE) docs

# The docs site (docs/, mkdocs.yml) into site/; --strict: a broken link or reference fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# On a GPU machine: the CUDA tests, then the benchmarks on the GPU (JSON in bench_results_gpu/).
test-gpu: $(STAMP)
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: no CUDA GPU visible to torch')"
	$(PY) -m pytest -q --timeout=1800 -m cuda tests
	$(VENV)/bin/eva-repro bench --output_dir bench_results_gpu --suite model --suite train --suite extract

demo: $(STAMP)
	$(VENV)/bin/eva-repro demo $(DEMO_ARGS)

bench: $(STAMP)
	$(VENV)/bin/eva-repro bench --output_dir bench_results $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
