"""The fetch path's settings, measured: latency of a paced stream and the idle CPU cost, for the
consumer's `fetch.wait.max.ms` and the producers' `linger.ms`.

    .venv/bin/python -m bench.fetch_path            # writes bench/results/fetch_path.csv

Each cell has a fresh in-memory broker. Its latency part is `kafray demo --brokers B --rate R -n N -X key=value` (2 workers, fresh
topics, a settled group before the first frame): the property applies to the workers' consumer and
producer and to the demo's frame producer. Each idle cell runs one `kafray worker` on an empty
topic for `--idle-seconds` and reads the CPU time of the worker and of the broker from /proc.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "target/release/kafray"


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid(port: str) -> int:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"nisshi") and any(port.encode() in a for a in cmd):
                return int(d.name)
    raise RuntimeError(f"no broker process on port {port}")


def latency(brokers: str, props: list[str], rate: int, frames: int) -> dict:
    x = [a for p in props for a in ("-X", p)]
    out = subprocess.run([str(CLI), "demo", "-b", brokers, "--rate", str(rate), "-n", str(frames), "--json", *x],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


def idle_cpu(brokers: str, props: list[str], seconds: float, n: int) -> tuple[float, float]:
    topic = f"idle-{int(time.time())}-{n}"
    x = [a for p in props for a in ("-X", p)]
    worker = subprocess.Popen([str(CLI), "worker", "-b", brokers, "--input-topic", topic, "--output-topic",
                               f"{topic}.out", "--group", topic, "--create-topics", "4", "--status-interval", "0", *x],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        # The worker logs each assignment: measure once it owns the partitions.
        for line in worker.stderr:
            if "partitions assigned" in line:
                break
        broker = broker_pid(brokers.rsplit(":", 1)[1])
        w0, b0, t0 = cpu_seconds(worker.pid), cpu_seconds(broker), time.monotonic()
        time.sleep(seconds)  # the measurement window itself
        w1, b1, t1 = cpu_seconds(worker.pid), cpu_seconds(broker), time.monotonic()
    finally:
        worker.terminate()
        worker.wait(60)
    return (w1 - w0) / (t1 - t0), (b1 - b0) / (t1 - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--frames", type=int, default=5000)
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--fetch-wait", default="500,100,20,10,5", help="fetch.wait.max.ms values (linger.ms 0)")
    p.add_argument("--linger", default="5,1,0", help="linger.ms values (at the default fetch.wait.max.ms)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/fetch_path.csv")
    args = p.parse_args()
    import kafray

    cells = [[f"fetch.wait.max.ms={v}", "linger.ms=0"] for v in args.fetch_wait.split(",")]
    cells += [[f"linger.ms={v}"] for v in args.linger.split(",")]
    rows = []
    for i, props in enumerate(cells):
        # A fresh broker per cell: topics and groups of earlier cells would load it.
        broker = kafray.EmbeddedBroker("memory")
        try:
            r = latency(broker.bootstrap, props, args.rate, args.frames)
            worker_cores, broker_cores = idle_cpu(broker.bootstrap, props, args.idle_seconds, i)
            rows.append({"properties": " ".join(props), "rate": args.rate, "frames": args.frames,
                         "p50_ms": r["latency_ms_p50"], "p95_ms": r["latency_ms_p95"], "p99_ms": r["latency_ms_p99"],
                         "max_ms": r["latency_ms_max"], "mean_batch": round(r["mean_batch_size"], 2),
                         "idle_worker_cpu_cores": round(worker_cores, 4), "idle_broker_cpu_cores": round(broker_cores, 4)})
            print(rows[-1], flush=True)
        finally:
            broker.stop()
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
