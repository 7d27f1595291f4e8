"""Backpressure's cost: how long one worker takes to drain a backlog, against its in-flight bound.

    .venv/bin/python -m bench.backpressure                      # writes bench/results/backpressure.csv
    .venv/bin/python -m bench.backpressure --kafray OLD=path/to/old/kafray --kafray NEW=target/release/kafray

Each cell has a fresh in-memory broker: `--frames` MNIST digits are queued on 4 partitions, then
one `kafray worker --max-in-flight M --batch-size 10` drains them; the cell's time runs from the
worker's start to the last prediction (`kafray eval`), and so includes the group join. The join is
measured apart (the first "partitions assigned" line) and taken off for `drain_s`. With several
`--kafray` binaries the cells alternate between them in one run, so their ratio is measured
under the same load.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def drain(cli: str, brokers: str, frames: int, bound: int, timeout: float) -> dict:
    produced = subprocess.run([cli, "produce", "mnist", "-b", brokers, "--partitions", "4", "--limit", str(frames),
                               "-q"], cwd=ROOT, capture_output=True, text=True)
    if produced.returncode != 0:
        raise RuntimeError(produced.stderr)
    started = time.monotonic()
    worker = subprocess.Popen([cli, "worker", "-b", brokers, "--max-in-flight", str(bound), "--batch-size", "10",
                               "--create-topics", "4", "--status-interval", "0", "--metrics-addr", ""], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True)
    joined: list[float] = []
    log: list[str] = []

    def watch() -> None:
        for line in worker.stderr:
            log.append(line)
            if "partitions assigned" in line and not joined:
                joined.append(time.monotonic())

    threading.Thread(target=watch, daemon=True).start()
    try:
        out = subprocess.run([cli, "eval", "-b", brokers, "--expect", str(frames), "--timeout", str(int(timeout)),
                              "--idle", str(int(timeout)), "--json"], cwd=ROOT, capture_output=True, text=True)
        finished = time.monotonic()
        report = json.loads(out.stdout)
        if worker.poll() is not None:
            raise RuntimeError(f"the worker ended (exit {worker.returncode}):\n{''.join(log[-20:])}")
    finally:
        worker.terminate()
        worker.wait(60)
    join_s = (joined[0] - started) if joined else float("nan")
    total_s = finished - started
    return {"predicted": report["distinct_frames"], "timed_out": report["distinct_frames"] < frames,
            "join_s": round(join_s, 2), "total_s": round(total_s, 2), "drain_s": round(total_s - join_s, 2),
            "frames_per_s": round(report["distinct_frames"] / max(total_s - join_s, 1e-3), 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=5000)
    p.add_argument("--bounds", default="20,50,200,1000", help="--max-in-flight values")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60, help="seconds a cell may take before it counts as timed out")
    p.add_argument("--kafray", action="append", metavar="NAME=PATH",
                   help="a kafray binary to measure (repeatable); default target/release/kafray")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/backpressure.csv")
    args = p.parse_args()
    import kafray

    binaries = [b.split("=", 1) for b in args.kafray or [f"current={ROOT / 'target/release/kafray'}"]]
    rows = []
    for round_ in range(args.rounds):
        for bound in (int(b) for b in args.bounds.split(",")):
            for name, cli in binaries:
                broker = kafray.EmbeddedBroker("memory")
                try:
                    r = drain(cli, broker.bootstrap, args.frames, bound, args.timeout)
                finally:
                    broker.stop()
                rows.append({"binary": name, "round": round_, "max_in_flight": bound, "frames": args.frames, **r})
                print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
