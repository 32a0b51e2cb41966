# Murmur: `make demo` builds and serves the demo chatbot; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

# torch is pinned here (a CPU build of 2.13.0 is what this project's machines carry); pyproject says torch>=2.9.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,ray,eval]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# Build recipes/demo.toml on CPU (stages already built are skipped), then serve it on http://127.0.0.1:8000.
demo: install
	$(VENV)/bin/murmur demo

clean:
	rm -rf $(VENV) runs .pytest_cache test-output
