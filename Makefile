# cocos-manager workflow. `make demo` shows the daemon at work; `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
GUEST_DIR ?= build/guest
PYTEST_ARGS ?=

.PHONY: install run test lint proto guest demo bench clean

install:
	@scripts/setup.sh

run: install
	$(VENV)/bin/cocos-manager

proto: install
	scripts/gen-proto.sh

lint: install
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts
	$(VENV)/bin/mypy

guest: install
	@scripts/build-test-guest.sh $(GUEST_DIR)

test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install guest
	@scripts/demo.sh

bench: install guest
	$(PY) -m scripts.bench

clean:
	rm -rf build tmp state .pytest_cache .mypy_cache .ruff_cache
