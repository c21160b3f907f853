# cocos-manager workflow. `make demo` shows the daemon at work; `make test` runs every test.
VENV ?= .venv
# import-linter and its rich live apart from the daemon's environment (scripts/lint-tools.txt).
TOOLS_VENV ?= .venv-tools
PY := $(VENV)/bin/python
GUEST_DIR ?= build/guest
PYTEST_ARGS ?=

.PHONY: install run test lint proto guest demo demo-dialout bench clean settings-table

install:
	@TOOLS_VENV=$(TOOLS_VENV) scripts/setup.sh

run: install
	$(VENV)/bin/cocos-manager

proto: install
	scripts/gen-proto.sh

# The README's table of every setting, from config/settings.py and config/settings_help.py
# (tests/test_settings_table.py fails when it is stale).
settings-table: install
	$(PY) -m cocos_manager.config.settings_table README.md

lint: install
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts
	$(VENV)/bin/mypy
	PYTHONPATH=src $(TOOLS_VENV)/bin/lint-imports

# The test guest (Debian cloud kernel + busybox initramfs playing the agent) and its 9p flavour
# (Debian's generic kernel, for CreateVm'd VMs) in GUEST_DIR/9p; cached.
guest: install
	@bash scripts/build-test-guest.sh $(GUEST_DIR)

# tests/e2e boots the test guest under QEMU: it is built (or found up to date) first.
# The tests run in TEST_WORKERS processes: most of their time is waiting (QEMU, timeouts), and
# four overlap well even on 2 CPUs. What tests share on the host (VNC displays, the sudo test's
# user) is made per worker (PYTEST_XDIST_WORKER).
TEST_WORKERS ?= 4
test: install lint guest
	TEST_GUEST_DIR=$(GUEST_DIR) $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

demo: install guest
	@VENV=$(VENV) GUEST_DIR=$(GUEST_DIR) bash scripts/demo.sh

# The seed README's "Verifying VM launch": a computations server of the seed's era pushes a
# request, the daemon dials it (MANAGER_GRPC_URL) and answers with the port, events and logs.
demo-dialout: install guest
	@GUEST_DIR=$(GUEST_DIR) $(PY) scripts/demo_dialout.py

# Real daemon, real QEMU (TCG) beside baselines from the same run: a table on stdout, then one
# JSON document, also in build/bench/latest.json. BENCH_ARGS=--quick for one short repetition.
BENCH_ARGS ?=
bench: install guest
	$(PY) -m scripts.bench $(BENCH_ARGS)

clean:
	rm -rf build tmp state .pytest_cache .mypy_cache .ruff_cache

# Long runs: `make soak` (1,000 Run/Stop cycles against the real daemon, leak report)
# and `make fuzz` (100k+ inputs per property: agent frames, settings, manifest).
SOAK_CYCLES ?= 1000
FUZZ_EXAMPLES ?= 100000
.PHONY: soak fuzz

soak: install
	$(PY) scripts/soak.py --cycles $(SOAK_CYCLES)

fuzz: install
	$(PY) scripts/fuzz.py --examples $(FUZZ_EXAMPLES)
