"""The benchmarks, a package run from the repository root: `.venv/bin/python -m bench.sweep`,
`-m bench.latency`, ... (each script's docstring has its command lines). What the scripts share
lives in bench/harness.py (workers, broker, Ray, topics, load, evaluation, CSVs) and
bench/hosts.py (hosts made of Linux namespaces); the tests in crates/kafray-py/tests import them
from here, never the other way round."""
