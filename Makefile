# sdmesh: one venv in .venv; torch's CPU build first so nothing pulls a CUDA torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= models/tiny-sd2
PORT ?= 50051

.PHONY: install lint test test-fast demo demo-local bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Also Debian's chromium and chromium-driver, for the page's browser test (tests/test_http_page.py), when missing.
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	@# the watermark's reference (tests/test_watermark.py); --no-deps: its requirements would pull opencv-python,
	@# which clashes with the headless build
	$(BIN)/pip install -q --no-deps invisible-watermark==0.2.0
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if ! command -v apt-get >/dev/null; then echo "install chromium and chromedriver for tests/test_http_page.py"; \
	  else sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	    $$sudo apt-get update -qq >/dev/null && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver >/dev/null; fi; }

# ruff (lint, then formatting) and mypy on the JAX-free request layer; CI runs this before the tests.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# The edit-test loop: everything but the tests that start processes (stacks, multi-process stages, the CLI).
test-fast: install
	$(BIN)/python -m pytest -q -m "not processes"

# The main job: the stage services as separate local processes (encoder, denoiser, decoder, gateway),
# then a generation through the gateway, on a locally built tiny random-weight model (its image is noise);
# then it prints the web page's URL and serves until Ctrl-C.
demo: install
	test -d $(MODEL) || $(BIN)/sdmesh make-checkpoint tiny-sd2 $(MODEL)
	$(BIN)/sdmesh up --model $(MODEL) --port $(PORT) & stack=$$!; trap 'kill $$stack; wait $$stack' EXIT; \
	until $(BIN)/sdmesh health 127.0.0.1:$(PORT) >/dev/null 2>&1; do kill -0 $$stack || exit 1; sleep 1; done; \
	$(BIN)/sdmesh generate "a photograph of an astronaut riding a horse" --server 127.0.0.1:$(PORT) --steps 20 --seed 0 --output-dir out && \
	echo "web page: http://127.0.0.1:$$(( $(PORT) + 1000 ))/  (OpenAI and A1111 APIs there too; Ctrl-C stops the stack)" && \
	wait $$stack

# The same job in one process, no services.
demo-local: install
	test -d $(MODEL) || $(BIN)/sdmesh make-checkpoint tiny-sd2 $(MODEL)
	$(BIN)/sdmesh generate "a photograph of an astronaut riding a horse" --model $(MODEL) --steps 20 --seed 0 --output-dir out

# Full-size SD2 architecture with random weights vs diffusers, same run (CPU: 256², 2 steps, fp32).
bench: install
	$(BIN)/python benchmarks/bench_vs_diffusers.py --resolution 256 --steps 2 --repeat 3 --json benchmarks/results/cpu_256_2steps_fp32.json

clean:
	rm -rf $(VENV) build *.egg-info out
