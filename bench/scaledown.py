"""Planned changes under a paced stream: how long a partition goes unread when the controller
retires a worker (a scale-down) or replaces every worker (a rolling update).

    .venv/bin/python -m bench.scaledown            # about 3 minutes here
    .venv/bin/python -m bench.scaledown --runs 3

A local Ray cluster (one node, 4 CPUs) and an in-memory Tansu broker. For each event, a fresh
deployment of 3 MNIST workers on a 6-partition topic; once every worker owns partitions,
`kafray produce` paces digits at --rate frames/s, and the event comes a few seconds in:

- scale-down: `Deployment.scale(2)`: the controller stops one worker gracefully;
- rolling-update: `Deployment.update(model=...)` (the same network under a new name): one new
  worker joins, then one old one drains, three times.

`kafray eval` reads every prediction back: nothing may be lost, and its
`longest_partition_wait_ms` is how long a partition went unanswered (the longest a frame waited
with no frame ahead of it on its partition), the event's gap. Each worker is a static group
member; one that leaves without telling the group leaves its partitions unread for the session
timeout (6 s). The target: at most 2 s.

Writes --out/scaledown.csv (one row per event and run) and prints it.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import ray

import kafray
from kafray import ray as kray

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "target" / "release" / "kafray"
TARGET_S = 2.0


def run_event(event: str, args, v2: str) -> dict:
    broker = kafray.EmbeddedBroker("memory")
    b = broker.bootstrap
    try:
        d = kray.Deployment.start(3, name=f"bench-{event}", address=None, brokers=b, create_topics=args.partitions,
                                  batch_size=20, status_interval_s=1)
        try:
            deadline = time.monotonic() + 120
            while not all(w.get("assigned_partitions", 0) > 0 for w in d.workers()):
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not all own partitions within 120 s")
                time.sleep(0.2)
            n = int(args.rate * args.seconds)
            producer = subprocess.Popen([str(CLI), "produce", "mnist", "-b", b, "-n", str(n), "--rate",
                                         str(args.rate), "--partitions", str(args.partitions), "--round-robin",
                                         "-q"], cwd=ROOT)
            time.sleep(args.event_after)  # the event lands mid-stream at a chosen time: the experiment
            began = time.monotonic()
            if event == "scale-down":
                d.scale(2)
            else:
                d.update(model=v2)
            took = time.monotonic() - began
            if producer.wait(timeout=args.seconds * 4 + 60) != 0:
                raise RuntimeError("the producer failed")
            report = json.loads(subprocess.run(
                [str(CLI), "eval", "-b", b, "-t", "predictions", "-n", str(n), "--json", "--timeout", "180"],
                capture_output=True, text=True, cwd=ROOT, timeout=240).stdout)
        finally:
            d.stop()
    finally:
        broker.stop()
    wait = report["longest_partition_wait_ms"]
    return {"event": event, "rate": args.rate, "partitions": args.partitions, "frames": n,
            "lost": n - report["distinct_frames"], "duplicates": report["duplicates"],
            "event_s": round(took, 2), "longest_partition_wait_s": round(wait / 1000, 2),
            "within_target": wait / 1000 <= TARGET_S, "latency_ms_p50": report["latency_ms_p50"],
            "latency_ms_p99": report["latency_ms_p99"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=300.0, help="frames/s")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the stream")
    p.add_argument("--event-after", type=float, default=8.0, help="seconds into the stream")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--events", default="scale-down,rolling-update")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaledown"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = Path(tempfile.mkdtemp(prefix="kafray-scaledown-"))
    v2 = models / "mnist_cnn_v2.onnx"
    mnist = Path(kafray.find_model("mnist"))
    shutil.copy(mnist, v2)
    # The built-in preprocessing of mnist_cnn, written out: the new name needs a TOML of its own.
    v2.with_suffix(".toml").write_text('layout = "nchw"\nheight = 28\nwidth = 28\ncolor = "gray"\n'
                                       'scale = 1.0\nmean = [0.0]\nstd = [1.0]\n')
    ray.init(num_cpus=4, namespace=kray.NAMESPACE, log_to_driver=False, logging_level="WARNING",
             include_dashboard=False)
    rows = []
    try:
        for run in range(args.runs):
            for event in args.events.split(","):
                row = {"run": run, **run_event(event, args, str(v2))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(models, ignore_errors=True)
    with open(out / "scaledown.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'scaledown.csv'}")
    return 0 if all(r["lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
