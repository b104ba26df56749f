# downpour: `make demo` trains the default model for about a minute; `make test` runs the test suite.
# Both create .venv and install what they need (torch pinned by constraints.txt to the CPU build on this machine).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[test,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/downpour train --seconds 60 --workers 2 --shards 2

# pytest runs inside a real 2-node Ray cluster on 127.0.0.1 (token authentication on), stopped even when tests fail,
# in TEST_PROCESSES processes (pytest-xdist; the Ray tests all run in one of them, see tests/conftest.py).
TEST_PROCESSES ?= 2
test: $(STAMP) chromium
	$(BIN)/ruff check src tests
	RAY=$(BIN)/ray scripts/ray_cluster.sh run $(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadgroup --durations=15

# The report's test opens the page in a real headless Chromium: install Debian's package when it is missing and we
# are root (quietly; without it that one test is skipped with its reason).
chromium:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
	  { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	    echo "note: could not install chromium; the report's browser test will be skipped"; }

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

bench: $(STAMP)
	$(BIN)/downpour bench ps

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
