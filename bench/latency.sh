#!/usr/bin/env bash
# Latency at rate (Crayfish's input-rate and bursty-rate experiments) in one command, from a fresh clone:
#   bash bench/latency.sh                      # MNIST and MobileNetV2; kafray's policies and the peer
#   bash bench/latency.sh --models mnist       # options: .venv/bin/python -m bench.latency --help
# Installs what it needs (scripts/setup.sh --python), builds the CLI, then runs `python -m bench.latency`.
# Results land in bench/results/latency/: cells.csv, records/, tables.md and the charts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --python >&2
cargo build --release -q
exec .venv/bin/python -m bench.latency "$@"
