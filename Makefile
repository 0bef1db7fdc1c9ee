# Benchmarks (bench/RESULTS.md). bench/run.py holds /tmp/clusterctl-bench.lock itself for the whole run.
PY ?= .venv/bin/python

.PHONY: bench bench-quick bench-deps

bench-deps:
	$(PY) -m pip install -q -e '.[bench]'
	npm install --prefix bench --no-audit --no-fund

bench:
	$(PY) bench/run.py

bench-quick:
	$(PY) bench/run.py --quick
