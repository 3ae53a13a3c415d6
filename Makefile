# medgen: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo demo-quick test test-fast test-slow bench clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes (the stamp name carries its checksum).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[all,dev]'  # every extra (the demo's cohort, multi-coil MRI) and the test tools
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: install
	$(PY) -m medgen demo --out runs/demo

demo-quick: install
	$(PY) -m medgen demo --quick --out runs/demo-quick

# The whole suite (677 tests: 15 min 14 s on a fresh clone, 17 min 27 s with the install; AMD EPYC, 2 cores);
# `make test-fast` skips the tests marked slow (DDP launches, 3D planted copies, sampling quality).
test: install
	$(PY) -m pytest -q --durations=20

test-fast: install
	$(PY) -m pytest -q -m "not slow" --durations=15

test-slow: install
	$(PY) -m pytest -q -m slow --durations=15

bench: install
	for b in eval/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
