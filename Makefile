# Two entry points for a fresh machine (see README):
#   make demo  - create .venv if needed, then run the main job on the built-in synthetic benchmark
#   make test  - create .venv if needed, then run the test suite
# The venv is rebuilt only when requirements.txt / constraints.txt change (hash marker).
# pip is deliberately NOT upgraded (a newer pip pulls avalanche's solver extra: jax and a dozen solvers).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PIN_HASH := $(shell cat requirements.txt constraints.txt | sha256sum | cut -c1-16)
MARKER := $(VENV)/.pins-$(PIN_HASH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test clean-venv

venv: $(MARKER)

$(MARKER): requirements.txt constraints.txt
	@if [ ! -f "$(MARKER)" ]; then \
	  echo ">> building $(VENV) for pins $(PIN_HASH)"; \
	  rm -rf "$(VENV)" && $(PYTHON) -m venv "$(VENV)" && \
	  "$(VENV)/bin/pip" install -r requirements.txt -c constraints.txt && \
	  "$(VENV)/bin/pip" install --no-deps -e . && \
	  "$(VENV)/bin/python" -c "import avalanche, torch, torchvision, torchaudio, timm, decord, av" && \
	  touch "$(MARKER)"; \
	fi

# The editable install is cheap; redo it so a moved checkout still imports its own sources.
demo: venv
	@"$(VENV)/bin/pip" install -q --no-deps -e . >/dev/null
	"$(VENV)/bin/python" experiments/run_stella.py $(ARGS)

test: venv
	@"$(VENV)/bin/pip" install -q --no-deps -e . >/dev/null
	@set +e; "$(VENV)/bin/python" -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected: failing"; exit 1; fi; exit $$rc

clean-venv:
	rm -rf "$(VENV)"
