"""Failover: how long the frames of a killed worker's partitions wait, and whether the others stall.

    .venv/bin/python -m bench.failover                    # kafray's defaults against librdkafka's
    .venv/bin/python -m bench.failover --settings kafray  # one setting only

For each setting, on a fresh in-memory Tansu broker: W `kafray worker` processes share P
partitions; once every worker owns partitions, `kafray produce` paces MNIST digits at R frames/s,
and K workers are killed with SIGKILL (no goodbye to the group) a few seconds in. `kafray eval`
then reads every prediction back. Per setting it reports:

- lost frames (must be 0) and duplicates;
- for the killed workers' partitions: the worst latency of a frame produced after the kill,
  which is how long those partitions went unanswered (detection + rebalance + catching up);
- for the survivors' partitions: the same, which shows whether a rebalance stopped them.

Results go to --out: failover.csv, records_<setting>.csv.gz (one row per frame) and
failover.png (latency against produce time, killed partitions against the others).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import kafray

from bench.harness import CLI, ROOT, create_topics

# librdkafka's own defaults, as kafray used them before it set its own (issue 10).
SETTINGS = {
    "kafray": [],
    "librdkafka": ["-X", "session.timeout.ms=45000", "-X", "heartbeat.interval.ms=3000",
                   "-X", "partition.assignment.strategy=range,roundrobin"],
}


class Worker:
    def __init__(self, brokers: str, group: str, worker_id: str, extra: list[str]):
        self.id = worker_id
        self.proc = subprocess.Popen(
            [str(CLI), "worker", "-b", brokers, "--group", group, "--worker-id", worker_id,
             "--status-interval", "1", *extra],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def owns_partitions(self) -> bool:
        return any("partitions assigned" in line for line in self.lines)


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {what}")
        time.sleep(0.05)


def run_setting(name: str, args) -> dict:
    broker = kafray.EmbeddedBroker("memory")
    b = broker.bootstrap
    group = f"failover-{name}"
    try:
        create_topics(b, [("frames", args.partitions), ("predictions", args.partitions), ("frames.dlq", 1)])
        workers = [Worker(b, group, f"w{i}", SETTINGS[name]) for i in range(args.workers)]
        # Every worker owns partitions: the group has settled before the stream starts.
        wait_for(lambda: all(w.owns_partitions() for w in workers), 120, "every worker owns partitions")
        n = int(args.rate * args.seconds)
        producer = subprocess.Popen(
            [str(CLI), "produce", "-b", b, "-n", str(n), "--rate", str(args.rate), "--round-robin", "-q",
             "-X", "enable.idempotence=false", "mnist", "--repeat", str(-(-n // 10000))], cwd=ROOT)
        time.sleep(args.kill_after)  # the kill lands mid-stream at a chosen time: this is the experiment
        killed = workers[: args.kill]
        kill_ms = int(time.time() * 1000)
        for w in killed:
            w.proc.send_signal(signal.SIGKILL)
        if producer.wait(timeout=args.seconds * 4 + 60) != 0:
            raise RuntimeError("the producer failed")
        records = Path(args.out) / f"records_{name}.csv"
        report = json.loads(subprocess.run(
            [str(CLI), "eval", "-b", b, "-t", "predictions", "-n", str(n), "--json", "--timeout", "180",
             "--records", str(records)], capture_output=True, text=True, cwd=ROOT, timeout=240).stdout)
        for w in workers[args.kill:]:
            w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            w.proc.wait(timeout=60)
    finally:
        broker.stop()
    rows = list(csv.DictReader(open(records)))
    with open(records, "rb") as f, gzip.open(f"{records}.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    records.unlink()
    killed_ids = {w.id for w in killed}
    # A partition was the killed workers' if they answered its frames before the kill.
    theirs = {int(r["partition"]) for r in rows if r["worker"] in killed_ids and int(r["ts_produce_ms"]) < kill_ms}
    after = [r for r in rows if r["ts_produce_ms"] and int(r["ts_produce_ms"]) >= kill_ms]

    def worst(part_set, inside: bool) -> float:
        lat = [int(r["latency_ms"]) for r in after if (int(r["partition"]) in part_set) == inside]
        return max(lat) / 1000 if lat else float("nan")

    return {
        "setting": name, "workers": args.workers, "killed": args.kill, "partitions": args.partitions,
        "rate": args.rate, "frames": n, "lost": n - report["distinct_frames"], "duplicates": report["duplicates"],
        "killed_partitions": len(theirs),
        "killed_partitions_worst_s": round(worst(theirs, True), 2),
        "other_partitions_worst_s": round(worst(theirs, False), 2),
        "latency_ms_p50": report["latency_ms_p50"], "latency_ms_p99": report["latency_ms_p99"],
        "kill_ms": kill_ms, "killed_partition_ids": " ".join(map(str, sorted(theirs))),
    }


def plot(out: Path, results: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False, sharey=True)
    for ax, res in zip(axes[0], results):
        theirs = {int(p) for p in res["killed_partition_ids"].split()}
        with gzip.open(out / f"records_{res['setting']}.csv.gz", "rt") as f:
            rows = [r for r in csv.DictReader(f) if r["ts_produce_ms"]]
        for inside, color, label in ((False, "tab:blue", "other partitions"),
                                     (True, "tab:red", "the killed workers' partitions")):
            pts = [((int(r["ts_produce_ms"]) - res["kill_ms"]) / 1000, int(r["latency_ms"]) / 1000)
                   for r in rows if (int(r["partition"]) in theirs) == inside]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=2, color=color, label=label, alpha=0.5)
        ax.axvline(0, color="grey", ls=":", label="kill -9")
        ax.set_yscale("log")
        ax.set_title(f"{res['setting']} settings: worst {res['killed_partitions_worst_s']} s "
                     f"(killed) / {res['other_partitions_worst_s']} s (others)", fontsize=10)
        ax.set_xlabel("frame produced, s after the kill")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("latency, s (log)")
    axes[0][0].legend(loc="upper left", fontsize=8, markerscale=4)
    fig.suptitle(f"Failover: {results[0]['workers']} workers on {results[0]['partitions']} partitions, "
                 f"{results[0]['killed']} killed, {results[0]['rate']} frames/s")
    fig.tight_layout()
    path = out / "failover.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--kill", type=int, default=2, help="workers killed with SIGKILL")
    p.add_argument("--rate", type=int, default=2000, help="frames/s")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the stream")
    p.add_argument("--kill-after", type=float, default=4.0, help="seconds into the stream")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/failover")
    args = p.parse_args(argv)
    if not CLI.is_file():
        p.error(f"{CLI} is missing: run `cargo build --release` first")
    if not 0 < args.kill < args.workers:
        p.error("--kill must leave at least one worker alive")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in [s for s in args.settings.split(",") if s]:
        if name not in SETTINGS:
            p.error(f"--settings: {name!r} is not one of {', '.join(SETTINGS)}")
        res = run_setting(name, args)
        print(json.dumps(res), flush=True)
        results.append(res)
    with open(args.out / "failover.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    (args.out / "run.json").write_text(json.dumps({
        "command": " ".join([".venv/bin/python", "-m", "bench.failover", *(argv or sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cores": os.cpu_count()}, indent=1))
    print(f"wrote {plot(args.out, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
