# dispatch — make run (demo town), make test (whole suite), make lint, make bench[-quick].
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test lint bench bench-quick conformance clean

# The compiled search of the responder index (dispatch/geo/_speedups.c) is optional for pip,
# required here: a missing compiler should fail the install, not quietly slow the index down.
export DISPATCH_REQUIRE_SPEEDUPS := 1

$(STAMP): pyproject.toml setup.py dispatch/geo/_speedups.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[speed]'
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test,speed]'
	touch $@

run: $(STAMP)
	$(BIN)/dispatch demo --port $(or $(PORT),8080)

test: $(TEST_STAMP)
	@command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server"; exit 1; }
	@command -v promtool >/dev/null || { echo "promtool is missing: apt-get install prometheus"; exit 1; }
	@test -x /usr/bin/chromium || { echo "/usr/bin/chromium is missing: apt-get install chromium"; exit 1; }
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(TEST_STAMP)
	$(BIN)/ruff check dispatch tests
	$(BIN)/mypy

bench: $(TEST_STAMP)
	$(BIN)/python -m tests.bench.run_all

# One run of each scenario, shorter windows (~5 minutes): the targets' verdicts, no page.
bench-quick: $(TEST_STAMP)
	$(BIN)/python -m tests.bench.run_all --quick --no-doc

conformance: $(STAMP)
	bash ../shared/conformance/run.sh

clean:
	rm -rf $(VENV) var build .pytest_cache .mypy_cache .ruff_cache dispatch/geo/_speedups.*.so
