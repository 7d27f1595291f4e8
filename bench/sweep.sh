#!/usr/bin/env bash
# The paper's throughput sweep in one command, from a fresh clone:
#   bash bench/sweep.sh                   # short profile, a few minutes on 2 cores
#   bash bench/sweep.sh --profile full    # workers 1,2,4,8,12 x batch 1,5,10,20,40
# Installs what it needs (scripts/setup.sh --python), builds the CLI, then runs
# `python -m bench.sweep` from the repository root with the given options (see
# `.venv/bin/python -m bench.sweep --help`). Results land in bench/results/sweep-<profile>/:
# sweep.csv, raw.csv, run.json, tables.md and the charts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --python >&2
cargo build --release -q
exec .venv/bin/python -m bench.sweep "$@"
