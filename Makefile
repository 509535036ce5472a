# The README's two commands: `make run` and `make test`. Both set up what they need
# (a virtual environment with the package, g++ for its fused statistics kernel, Debian's
# Fashion-MNIST; for the tests also Debian's Chromium, which renders the HTML report)
# and are idempotent.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium
CXX_COMPILER := /usr/bin/g++
# the native kernels, compiled at set-up (python -m optinsight.native)
NATIVE_SOURCES := $(wildcard optinsight/native/*.cc)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
EPOCHS ?= 10

# The oldest supported TensorFlow and Keras (optinsight/compat.py, setup.cfg): `make
# test` also runs a fast subset of the tests on them, in a second environment.
OLDEST_VENV ?= .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_PINS := tensorflow==2.16.2 keras==3.3.3
OLDEST_INSTALLED := $(OLDEST_VENV)/.installed
OLDEST_TESTS := tests/test_dynamics.py tests/test_native.py \
	tests/test_callback.py::test_plain_sequential_is_instrumented_and_restored \
	tests/test_callback.py::test_resume_continues_steps_epochs_and_state \
	tests/test_callback.py::test_predict_and_evaluate_inside_fit_leave_the_recording_on \
	tests/test_report.py::test_summary_table \
	tests/test_recorder.py::test_custom_loop_records_what_fit_records \
	tests/test_recorder.py::test_the_clipped_gradient_is_recorded \
	tests/test_workflows.py::test_loss_scale_growing_every_step_in_fit \
	tests/test_workflows.py::test_fine_tuning_records_the_variables_each_fit_trains \
	tests/test_probes.py::test_gradient_covariance_and_noise_scale \
	tests/test_hessian.py::test_hvp_matches_dense tests/test_hessian.py::test_lanczos_top_eigenvalues \
	tests/test_hessian.py::test_hvp_is_compiled_once \
	tests/test_hessian.py::test_auto_examples_fit_the_products_in_the_time_budget \
	tests/test_ntk.py::test_dense_layers_are_factored_only_where_the_gradient_is_an_outer_product \
	tests/test_ntk.py::test_factored_dense_under_mixed_precision \
	tests/test_resume.py::test_resume_keeps_the_compiled_learning_rate \
	tests/test_resume.py::test_resume_after_unfreezing_layers_continues_the_run \
	tests/test_pipelines.py::test_unknown_length_records_what_a_known_length_records \
	tests/test_pipelines.py::test_loss_scale_skips_are_recorded_as_skipped \
	tests/test_diagnosis_causes.py::test_vanishing_gradients_through_sigmoids_are_not_dead_relus \
	tests/test_diagnosis_causes.py::test_nonfinite_names_the_layer_where_nan_first_appears \
	tests/test_diagnosis_causes.py::test_stop_on_error_stops_at_the_nonfinite_step \
	tests/test_resume.py::test_the_run_so_far_is_the_run_on_disk_also_after_resume \
	tests/test_first_hour.py::test_keras_asynchronous_dispatch_stays_on_and_records_the_same \
	tests/test_first_hour.py::test_a_run_and_its_findings_show_as_html_in_a_notebook \
	tests/test_schedule.py tests/test_architecture_imports.py tests/test_compat.py \
	tests/test_instruments.py tests/test_instruments_fit.py

# Benchmark-only extras (PyTorch and PyHessian, JAX: the references benchmarks/hessian.py
# and benchmarks/ntk.py compare against) live in their own environment.
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_INSTALLED := $(BENCH_VENV)/.installed

.PHONY: run test test-newest test-oldest setup bench-setup data lint

setup: $(INSTALLED)

$(INSTALLED): setup.cfg pyproject.toml $(NATIVE_SOURCES) | $(CXX_COMPILER)
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m optinsight.native  # compile the fused kernel now, not in the first fit
	touch $@

$(OLDEST_INSTALLED): setup.cfg pyproject.toml $(NATIVE_SOURCES) | $(CXX_COMPILER)
	[ -x $(OLDEST_PY) ] || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install -q --upgrade pip
	$(OLDEST_PY) -m pip install -q -e ".[test]" $(OLDEST_PINS)
	$(OLDEST_PY) -m optinsight.native
	touch $@

bench-setup: $(BENCH_INSTALLED) $(FASHION_MNIST)

$(BENCH_INSTALLED): setup.cfg pyproject.toml benchmarks/requirements.txt | $(CXX_COMPILER)
	[ -x $(BENCH_PY) ] || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q -e . -r benchmarks/requirements.txt
	$(BENCH_PY) -m optinsight.native
	touch $@

data: $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist

$(CXX_COMPILER):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq g++

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

run: $(INSTALLED) $(FASHION_MNIST)
	$(PY) main.py --dataset fashion-mnist --epochs $(EPOCHS)

test: test-newest test-oldest

test-newest: $(INSTALLED) $(FASHION_MNIST) $(CHROMIUM)
	$(PY) -m ruff check .
	$(PY) -m pytest

test-oldest: $(OLDEST_INSTALLED)
	$(OLDEST_PY) -c "import tensorflow as tf, keras; print('oldest supported:', tf.__version__, keras.__version__)"
	$(OLDEST_PY) -m pytest -p no:cacheprovider $(OLDEST_TESTS)

lint: $(INSTALLED)
	$(PY) -m ruff check .
