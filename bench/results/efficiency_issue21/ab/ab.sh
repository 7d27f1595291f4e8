#!/usr/bin/env bash
# MNIST CPU efficiency, kafray before issue 21 (97c50b8^) against after, interleaved on one machine.
# Builds both Python wheels (maturin, no auditwheel), then runs the sweep with each installed in turn,
# twice; puts the editable build back at the end. Run from the repository root.
set -euo pipefail
ROOT=$PWD
git worktree add -f /tmp/kafray-old 97c50b8^
(cd /tmp/kafray-old && CARGO_TARGET_DIR=/tmp/kafray-old-target VIRTUAL_ENV=$ROOT/.venv \
  "$ROOT/.venv/bin/maturin" build --release -q --auditwheel skip -m crates/kafray-py/Cargo.toml -o /tmp/wheels-old)
VIRTUAL_ENV=$PWD/.venv .venv/bin/maturin build --release -q --auditwheel skip -m crates/kafray-py/Cargo.toml -o /tmp/wheels-new
for i in 1 2; do
  for v in old new; do
    .venv/bin/pip install -q --force-reinstall --no-deps /tmp/wheels-$v/kafray-*-linux_x86_64.whl
    .venv/bin/python -m bench.sweep --models mnist --systems kafray --workers 1,2 --batches 10,40 --max-wait-ms 0 \
      --out /tmp/eff-$v-$i > /tmp/eff-$v-$i.log 2>&1
    grep -A7 "CPU efficiency" /tmp/eff-$v-$i/tables.md | grep "| mnist" | awk -F'|' -v v=$v -v i=$i '{print v, i, $4, $5, $9}'
  done
done
git worktree remove --force /tmp/kafray-old
VIRTUAL_ENV=$PWD/.venv .venv/bin/maturin develop --release -q -m crates/kafray-py/Cargo.toml
