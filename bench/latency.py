"""Latency at rate (Crayfish, Horchidan et al., EDBT 2024): how long a frame takes, from its produce
timestamp to its prediction, at paced input rates and in a bursty stream, for kafray's batching
policies and the Python peer, side by side on one broker.

    .venv/bin/python -m bench.latency                       # MNIST and MobileNetV2, every system
    .venv/bin/python -m bench.latency --models mnist --seconds 4

For each model and system (a batching policy of kafray, or the peer), on W Ray actors (2 by default):
1. saturation: a burst of frames as fast as the producer sends them; images/s from the first
   frame's produce timestamp to the last prediction;
2. paced streams at 10, 30, 50, 70 and 90 % of that system's saturation, `--seconds` each;
3. a bursty stream: `--burst-high` % of saturation for 2 s, then `--burst-low` % for 2 s, repeated.
Each cell has fresh topics and a settled group before the first frame. Per cell: p50/p95/p99/max
latency, throughput, mean batch and the workers' CPU; for kafray also where each frame's time went
(fetch, decode, queue, infer, ack). Latency ends at the prediction's `ts_done_ms` (the model's
answer, before its produce), the same for both systems; the ack part is reported apart.

Writes `--out` (default bench/results/latency/): cells.csv, records/<cell>.csv.gz (one row per frame),
run.json, tables.md, latency_<model>.png (p50 and p99 against offered load, log scale) and
bursty_<model>.png (latency and batch size through the bursty run).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ray

from bench import harness
from bench.harness import (CLI, MODEL_TITLES, PHOTOS, ROOT, Pool, cluster, cpu_seconds, create_topics, machine,
                           machine_busy, read_csv, write_csv)

if __name__ != "__main__":
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LOADS = (0.1, 0.3, 0.5, 0.7, 0.9)
FRAME_PARTS = ("fetch", "decode", "queue", "infer", "ack")


def systems(args) -> dict[str, dict]:
    """Each line of the charts: which worker, and its batching settings."""
    b = args.batch_size
    return {
        "kafray": dict(system="kafray", batch_size=b, max_wait_ms=0,
                       label=f"kafray, adaptive (default; batch <= {b})"),
        "kafray-target": dict(system="kafray", batch_size=b, max_wait_ms=0, latency_target_ms=args.target_ms,
                              label=f"kafray, latency target {args.target_ms} ms"),
        "kafray-fixed": dict(system="kafray", batch_size=b, max_wait_ms=20,
                             label=f"kafray, fixed window (20 ms, batch {b}: the old default)"),
        "peer": dict(system="peer", batch_size=b, max_wait_ms=args.peer_max_wait_ms,
                     label=f"peer, consume(num_messages={b}, timeout={args.peer_max_wait_ms} ms)"),
    }


def produce_command(model: str, brokers: str, topic: str, frames: int, photos: Path, rate: float | None = None,
                    schedule: str | None = None) -> list[str]:
    cmd = harness.produce_command(model, brokers, topic, frames, photos)
    if rate:
        cmd += ["--rate", f"{rate:.1f}"]
    if schedule:
        cmd += ["--schedule", schedule]
    return cmd


def percentile(sorted_values: list[float], q: float):
    if not sorted_values:
        return ""
    return sorted_values[round((len(sorted_values) - 1) * q)]


def run_cell(pool: Pool, name: str, cfg: dict, model: str, kind: str, load: float, frames: int, args, run_id: str,
             brokers: str, rate: float | None = None, schedule: str | None = None) -> dict:
    cell = f"{model}-{name}-{kind}-{int(load * 100)}"
    topic = f"lat-{run_id}-{cell}"
    out = f"{topic}.predictions"
    create_topics(brokers, [(topic, args.partitions), (out, args.partitions), (f"{topic}.dlq", 1)])
    extra = {"latency_target_ms": cfg["latency_target_ms"]} if cfg.get("latency_target_ms") else {}
    max_in_flight = max(1000, 4 * cfg["batch_size"])
    ray.get([a.start.remote(brokers, topic, out, f"{topic}-group", cfg["batch_size"], cfg["max_wait_ms"],
                            max_in_flight, **extra) for a in pool.actors], timeout=120)

    def settled(s):
        owned = [x.get("assigned_partitions", 0) for x in s]
        return sum(owned) == args.partitions and min(owned) > 0, f"group did not settle, partitions owned {owned}"

    def answered(s):
        done = sum(x.get("predicted", 0) + x.get("dead_lettered", 0) for x in s)
        return done >= frames, f"{done}/{frames} done"

    pool.wait_until(settled, 90, 0.1, cell)
    before = pool.stats()
    cpu0, busy0 = cpu_seconds(pool.pids) if pool.local else float("nan"), machine_busy()
    t0 = time.monotonic()
    produced = subprocess.run(produce_command(model, brokers, topic, frames, args.photos, rate, schedule),
                              capture_output=True, text=True, timeout=900)
    if produced.returncode != 0:
        raise RuntimeError(f"producer failed: {produced.stderr.strip()}")
    pool.wait_until(answered, 600, 0.02, cell)
    wall = time.monotonic() - t0
    cpu1, busy1 = cpu_seconds(pool.pids) if pool.local else float("nan"), machine_busy()
    final = ray.get([a.stop.remote() for a in pool.actors], timeout=120)
    records = args.out / "records" / f"{cell}.csv"
    ev = subprocess.run([str(CLI), "eval", "-b", brokers, "-t", out, "-n", str(frames), "--json", "--timeout", "120",
                         "--idle", "3", "--records", str(records)], capture_output=True, text=True, timeout=180)
    if not ev.stdout.strip():
        raise RuntimeError(f"kafray eval failed: {ev.stderr.strip()}")
    report = json.loads(ev.stdout)
    rows = read_csv(records)
    with open(records, "rb") as src, gzip.open(f"{records}.gz", "wb") as dst:  # 10x smaller to keep
        shutil.copyfileobj(src, dst)
    records.unlink()
    lat = sorted(float(r["latency_ms"]) for r in rows if r["latency_ms"] != "")
    span_ms = max(1, max(int(r["ts_done_ms"]) for r in rows) - min(int(r["ts_produce_ms"]) for r in rows))
    row = {
        "model": model, "system": name, "kind": kind, "load": load,
        "offered_per_s": round(rate, 1) if rate else "", "schedule": schedule or "", "frames": frames,
        "distinct": report["distinct_frames"], "duplicates": report["duplicates"],
        "images_per_s": round(len(rows) * 1000 / span_ms, 1),
        "latency_ms_p50": percentile(lat, 0.5), "latency_ms_p95": percentile(lat, 0.95),
        "latency_ms_p99": percentile(lat, 0.99), "latency_ms_max": lat[-1] if lat else "",
        "mean_batch": round(report["mean_batch_size"], 2),
        "accuracy": report["accuracy"] if report["accuracy"] is not None else "",
        "worker_cpu_cores": round((cpu1 - cpu0) / wall, 2),
        "machine_cpu_cores": round((busy1[0] - busy0[0]) / (busy1[1] - busy0[1]) * (os.cpu_count() or 1), 2),
        "batch_limit_end": max((x.get("batch_limit", 0) for x in final), default=""),
        # A worker that starts again (after results the broker would not take) reads again what
        # was in flight: duplicates are bounded by restarts x max_in_flight.
        "restarts": sum(x.get("restarts", 0) for x in final) - sum(x.get("restarts", 0) for x in before),
        "max_in_flight": max_in_flight,
    }
    # Where a frame's time went (kafray): means over this cell's acknowledged predictions.
    if cfg["system"] == "kafray":
        n = sum(x["frame_us"]["frames"] for x in final) - sum(x["frame_us"]["frames"] for x in before)
        for part in FRAME_PARTS:
            us = sum(x["frame_us"][part] for x in final) - sum(x["frame_us"][part] for x in before)
            row[f"{part}_ms"] = round(us / 1000 / max(1, n), 3)
    else:
        for part in FRAME_PARTS:
            row[f"{part}_ms"] = ""
    return row


def run_system(model: str, name: str, cfg: dict, args, run_id: str, brokers: str) -> list[dict]:
    pool = Pool(cfg["system"], args.workers, model, 1)
    rows = []

    def show(r):
        print(f"{model:<13} {name:<14} {r['kind']:<10} {str(r['offered_per_s'] or r['schedule']):>12}: "
              f"{r['images_per_s']:>8.0f} img/s  p50 {r['latency_ms_p50']} p99 {r['latency_ms_p99']} "
              f"max {r['latency_ms_max']} ms  batch {r['mean_batch']:.1f}  cpu {r['worker_cpu_cores']:.2f}",
              flush=True)

    try:
        sat = run_cell(pool, name, cfg, model, "saturation", 1.0, args.saturation_frames[model], args, run_id, brokers)
        show(sat)
        rows.append(sat)
        peak = float(sat["images_per_s"])
        for load in LOADS:
            rate = peak * load
            frames = max(50, int(rate * args.seconds))
            r = run_cell(pool, name, cfg, model, "paced", load, frames, args, run_id, brokers, rate=rate)
            show(r)
            rows.append(r)
        hi, lo = peak * args.burst_high / 100, peak * args.burst_low / 100
        schedule = f"{hi:.1f}:2,{lo:.1f}:2"
        frames = int((hi + lo) * 2 * args.burst_cycles)
        r = run_cell(pool, name, cfg, model, "bursty", args.burst_high / 100, frames, args, run_id, brokers,
                     schedule=schedule)
        show(r)
        rows.append(r)
    finally:
        pool.close()
    return rows


def plot(out: Path, rows: list[dict], meta: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = list(meta["systems"])
    colors = dict(zip(names, ["tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple"]))
    for model in sorted({r["model"] for r in rows}, key=lambda m: m != "mnist"):
        fig, ax = plt.subplots(figsize=(8, 5))
        for name in names:
            pts = sorted((float(r["offered_per_s"]), float(r["latency_ms_p50"]), float(r["latency_ms_p99"]))
                         for r in rows if r["model"] == model and r["system"] == name and r["kind"] == "paced")
            if not pts:
                continue
            x, p50, p99 = zip(*pts)
            label = meta["systems"][name]["label"]
            ax.plot(x, p99, marker="o", color=colors[name], label=f"{label}: p99")
            ax.plot(x, p50, marker=".", ls="--", color=colors[name], label="p50", alpha=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("offered load, frames/s (10, 30, 50, 70, 90 % of each system's saturation)")
        ax.set_ylabel("latency, ms (produce timestamp -> prediction), log scale")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
        note = f"\n{meta['note']}" if meta.get("note") else ""
        ax.set_title(f"{MODEL_TITLES.get(model, model)}: latency against load, {meta['workers']} workers, "
                     f"{meta['machine']['cores']} cores{note}", fontsize=10)
        fig.tight_layout()
        path = out / f"latency_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        bursty = [r for r in rows if r["model"] == model and r["kind"] == "bursty"]
        if not bursty:
            continue
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        for r in bursty:
            path = out / "records" / f"{model}-{r['system']}-bursty-{int(float(r['load']) * 100)}.csv.gz"
            with gzip.open(path, "rt", newline="") as f:
                recs = list(csv.DictReader(f))
            recs = [x for x in recs if x["ts_produce_ms"]]
            if not recs:
                continue
            t0 = min(int(x["ts_produce_ms"]) for x in recs)
            # p99 and mean batch per 250 ms of produce time.
            bins: dict[int, list] = {}
            for x in recs:
                bins.setdefault((int(x["ts_produce_ms"]) - t0) // 250, []).append(x)
            t, p99, batch = [], [], []
            for k in sorted(bins):
                lat = sorted(float(x["latency_ms"]) for x in bins[k])
                t.append(k * 0.25)
                p99.append(max(1.0, percentile(lat, 0.99)))
                batch.append(sum(int(x["batch_size"]) for x in bins[k]) / len(bins[k]))
            a1.plot(t, p99, color=colors[r["system"]], label=meta["systems"][r["system"]]["label"])
            a2.plot(t, batch, color=colors[r["system"]])
        a1.set_yscale("log")
        a1.set_ylabel("p99 latency per 250 ms, ms")
        a1.grid(alpha=0.3, which="both")
        a1.legend(fontsize=7)
        a2.set_ylabel("mean batch of its frames")
        a2.set_xlabel(f"seconds (2 s at {meta['burst_high']} %, 2 s at {meta['burst_low']} % of saturation, repeated)")
        a2.grid(alpha=0.3)
        a1.set_title(f"{MODEL_TITLES.get(model, model)}: bursty input"
                     + (f", {meta['note']}" if meta.get("note") else ""), fontsize=10)
        fig.tight_layout()
        path = out / f"bursty_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def tables(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['started']}, {meta['machine']['cpu']} ({meta['machine']['cores']} cores), {meta['broker']}, "
             f"{meta['workers']} workers; command `{meta['command']}`."
             + (f" {meta['note'][0].upper()}{meta['note'][1:]}." if meta.get("note") else ""), ""]
    for model in sorted({r["model"] for r in rows}, key=lambda m: m != "mnist"):
        lines += [f"**{MODEL_TITLES.get(model, model)}**", "",
                  "| system | cell | offered/s | img/s | p50 | p95 | p99 | max ms | mean batch | worker CPU cores "
                  "| fetch | decode | queue | infer | ack (ms per frame) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["model"] != model:
                continue
            cell = r["kind"] if r["kind"] != "paced" else f"{float(r['load']) * 100:.0f} %"
            offered = r["offered_per_s"] or (r["schedule"] and "bursty") or "burst"
            parts = " | ".join(str(r[f"{p}_ms"]) if r[f"{p}_ms"] != "" else "-" for p in FRAME_PARTS)
            lines.append(f"| {r['system']} | {cell} | {offered} | {float(r['images_per_s']):.0f} | "
                         f"{r['latency_ms_p50']} | {r['latency_ms_p95']} | {r['latency_ms_p99']} | "
                         f"{r['latency_ms_max']} | {float(r['mean_batch']):.1f} | {r['worker_cpu_cores']} | {parts} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mnist,mobilenet_v2", help="comma list of mnist, mobilenet_v2")
    p.add_argument("--systems", help="comma list of kafray, kafray-target, kafray-fixed, peer (default: all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=10, help="largest batch, every system")
    p.add_argument("--target-ms", type=int, default=10, help="kafray-target's --latency-target-ms")
    p.add_argument("--peer-max-wait-ms", type=int, default=20, help="the peer's consume() timeout")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each paced cell")
    p.add_argument("--burst-high", type=float, default=150.0, help="%% of saturation in the bursts")
    p.add_argument("--burst-low", type=float, default=30.0, help="%% of saturation between bursts")
    p.add_argument("--burst-cycles", type=int, default=3)
    p.add_argument("--photos", type=Path, default=PHOTOS)
    p.add_argument("--brokers", help="a Kafka cluster to use (default: a local Tansu broker, in memory)")
    p.add_argument("--address", help="a Ray cluster to join (default: a local one, on this machine's cores)")
    p.add_argument("--note", help="what sets this run apart (e.g. the network), for run.json and the charts' titles")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/latency")
    p.add_argument("--plot-only", action="store_true", help="redraw charts and tables from --out")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "records").mkdir(exist_ok=True)
    if args.plot_only:
        meta = json.loads((args.out / "run.json").read_text())
        rows = read_csv(args.out / "cells.csv")
        for path in plot(args.out, rows, meta):
            print(f"wrote {path}")
        (args.out / "tables.md").write_text(tables(rows, meta))
        return 0
    all_systems = systems(args)
    chosen = args.systems.split(",") if args.systems else list(all_systems)
    for s in chosen:
        if s not in all_systems:
            p.error(f"--systems: {s!r} is not one of {', '.join(all_systems)}")
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in ("mnist", "mobilenet_v2"):
            p.error(f"--models: {m!r} is not one of mnist, mobilenet_v2")
    if not CLI.is_file():
        p.error(f"{CLI} is missing: run `cargo build --release` first")
    args.saturation_frames = {"mnist": 30000, "mobilenet_v2": 600}
    os.chdir(ROOT)
    began = time.time()
    meta = {"command": " ".join([".venv/bin/python", "-m", "bench.latency", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(), "workers": args.workers,
            "partitions": args.partitions, "seconds": args.seconds, "burst_high": args.burst_high,
            "burst_low": args.burst_low, "systems": {s: all_systems[s] for s in chosen}, "note": args.note}
    with cluster(args.brokers, args.address, args.workers) as (brokers, meta["broker"]):
        run_id = str(int(began))
        rows = []
        for model in models:
            for name in chosen:
                rows += run_system(model, name, all_systems[name], args, run_id, brokers)
                write_csv(args.out / "cells.csv", rows)
    meta["seconds_total"] = round(time.time() - began, 1)
    (args.out / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    for path in plot(args.out, rows, meta):
        print(f"wrote {path}")
    (args.out / "tables.md").write_text(tables(rows, meta))
    print(f"wrote {args.out / 'tables.md'}, {args.out / 'cells.csv'} in {meta['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
