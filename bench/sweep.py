"""The paper's throughput sweep (Fig. 9): workers x batch size, kafray against a Python peer, with
the raw limit of the same cores, in one run.

    .venv/bin/python -m bench.sweep --profile short     # a few minutes on 2 cores
    .venv/bin/python -m bench.sweep --profile full      # workers 1,2,4,8,12 x batch 1,5,10,20,40

Run from the repository root: bench/ is a package, and what the benchmarks share is in bench/harness.py.

For each model (MNIST CNN on raw digits; MobileNetV2 on 224x224 JPEG photos), each number of
workers W and each batch size B, and each system (kafray's Rust worker, `peer.py`), one cell:

1. fresh input/output topics whose partition count every worker count divides (24 for 1..12), and
   the producer spreads frames round-robin over them, so every worker gets an equal share;
2. W Ray actors (one CPU each) start the system's worker in one consumer group; the cell waits
   until every partition is assigned, so no rebalance falls inside the measurement;
3. one producer (`kafray produce`) publishes the frames as fast as the broker takes them;
4. once every frame has a result, `kafray eval` reads the results back: images/s from the first
   frame's produce timestamp to the last result (so the first batches' work counts), latency from the frame's produce timestamp to its result (so it
   includes the time a frame queued behind the others: the load is saturating), mean real batch,
   accuracy, duplicates; the actors report CPU time and per-stage time.

The raw limit is `kafray.raw_limit`: the same model, decode included, on one thread per core of
this machine, at the best of the sweep's batch sizes (a worker is not pinned to one core: kafray decodes on a second thread,
and the broker and producer share the cores too), with no Kafka and no Ray. One thread alone is
measured as well, for the cost per image. Results go to `--out`: `sweep.csv` (one row per cell), `raw.csv`, `run.json`
(machine, versions, command) and the charts `fig9_<model>.png`, `ratios.png`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import ray

import kafray

from bench.harness import (CLI, CPU_CLASSES, MNIST, MODEL_TITLES, PHOTOS, ROOT, Pool, cluster, cpu_by_thread,
                           cpu_seconds, create_topics, evaluate, machine, machine_busy, produce_command, read_csv,
                           write_csv)

PROFILES = {
    "short": dict(workers=[1, 2, 4], batches=[1, 10, 40], frames={"mnist": 10000, "mobilenet_v2": 400}),
    "full": dict(workers=[1, 2, 4, 8, 12], batches=[1, 5, 10, 20, 40],
                 frames={"mnist": 10000, "mobilenet_v2": 1200}),
}
SYSTEMS = ("kafray", "peer")
STAGES = ("poll", "decode", "handoff", "idle", "infer", "produce")


def run_cell(pool: Pool, system: str, model: str, workers: int, batch: int, frames: int, args, run_id: str,
             brokers: str, partitions: int, size: str = "224", settings: dict | None = None,
             backlog: bool = False) -> dict:
    """`settings`: further kafray worker settings (e.g. decode_threads), named in the topic.
    `backlog`: the frames are published before the workers start, and `images_per_s` is their
    drain (first prediction to last), so a producer slower than the workers does not cap it;
    otherwise they are published once the group settled, and it runs from the first frame's
    produce timestamp to the last prediction."""
    settings = settings or {}
    # A model given as a path names its topic by its file name (a topic name takes no "/").
    named = "".join(f"-{k}{v}" for k, v in sorted(settings.items()) if isinstance(v, (int, str))).replace("_", "")
    topic = f"sweep-{run_id}-{Path(model).stem}-{system}-w{workers}-b{batch}-{size}{named}"
    out = f"{topic}.predictions"
    t_started = time.monotonic()
    create_topics(brokers, [(topic, partitions), (out, partitions), (f"{topic}.dlq", 1)])

    def produce():
        began = time.monotonic()
        produced = subprocess.run(produce_command(model, brokers, topic, frames, args.photos, size),
                                  capture_output=True, text=True, timeout=600)
        if produced.returncode != 0:
            raise RuntimeError(f"producer failed: {produced.stderr.strip()}")
        return frames / (time.monotonic() - began)

    def start_of_measurement():  # the workers' CPU, the machine's, the workers' by thread, the clock
        return (cpu_seconds(pool.pids) if pool.local else float("nan"), machine_busy(),
                cpu_by_thread(pool.pids) if pool.local else {}, time.monotonic())

    producer_rate = produce() if backlog else None
    cpu0, busy0, threads0, t0 = start_of_measurement()
    ray.get([a.start.remote(brokers, topic, out, f"{topic}-group", batch, args.max_wait_ms,
                            max(1000, 4 * batch), **settings) for a in pool.actors], timeout=120)
    cell = f"{system} w{workers} b{batch}"

    def settled(s):  # every partition owned, every worker owning some
        owned = [x.get("assigned_partitions", 0) for x in s]
        return sum(owned) == partitions and min(owned) > 0, f"group did not settle, partitions owned {owned}"

    def answered(s):
        done = sum(x.get("predicted", 0) + x.get("dead_lettered", 0) for x in s)
        return done >= frames, f"{done}/{frames} done"

    if backlog:
        # The workers drain from their start: every counter of this cell counts.
        before, t_settled = [{} for _ in pool.actors], t0
    else:
        pool.wait_until(settled, 90, 0.1, cell)
        t_settled = time.monotonic()
        before = pool.stats()
        cpu0, busy0, threads0, t0 = start_of_measurement()
        producer_rate = produce()
    t_produced = time.monotonic()
    pool.wait_until(answered, 600, args.poll_s, cell)
    t1 = time.monotonic()
    cpu1, busy1 = cpu_seconds(pool.pids) if pool.local else float("nan"), machine_busy()
    threads1 = cpu_by_thread(pool.pids) if pool.local else {}
    final = ray.get([a.stop.remote() for a in pool.actors], timeout=120)
    t_stopped = time.monotonic()
    report = evaluate(brokers, out, frames)
    if args.verbose:
        first = f"publish {t0 - t_started:.1f} s, start" if backlog else f"settle {t_settled - t_started:.1f} s, produce"
        print(f"  {first} {t_produced - t0:.1f} s, done {t1 - t0:.1f} s, stop {t_stopped - t1:.1f} s, "
              f"eval {time.monotonic() - t_stopped:.1f} s")
    wall = t1 - t0
    # Stage times over the measurement only (the counters run from the worker's start).
    stage_us = {k: sum(x.get("stages_us", {}).get(k, 0) for x in final)
                - sum(x.get("stages_us", {}).get(k, 0) for x in before) for k in STAGES}
    return {
        "system": system, "model": model, "workers": workers, "batch_size": batch, "frames": frames,
        "images_per_s": round(report["throughput_per_s"], 1) if backlog else
        round(frames * 1000 / max(1, report["last_done_ms"] - report["first_produced_ms"]), 1),
        "wall_images_per_s": round(frames / wall, 1),
        "producer_images_per_s": round(producer_rate, 1),
        "latency_ms_p50": report["latency_ms_p50"], "latency_ms_p99": report["latency_ms_p99"],
        "mean_batch": round(report["mean_batch_size"], 2),
        "accuracy": report["accuracy"] if report["accuracy"] is not None else "",
        "distinct": report["distinct_frames"], "duplicates": report["duplicates"],
        "workers_with_results": len(report["per_worker"]),
        "worker_cpu_cores": round((cpu1 - cpu0) / wall, 2),
        "images_per_cpu_s": round(frames / (cpu1 - cpu0), 1) if cpu1 > cpu0 else "",
        **{f"cpu_{c}_cores": round((threads1[c] - threads0[c]) / wall, 3) if threads1 else "" for c in CPU_CLASSES},
        "machine_cpu_cores": round((busy1[0] - busy0[0]) / (busy1[1] - busy0[1]) * (os.cpu_count() or 1), 2),
        **{f"{k}_ms_per_image": round(stage_us[k] / 1000 / frames, 4) for k in STAGES},
    }


def raw_limits(models: list[str], batches: list[int], workers: list[int], args) -> list[dict]:
    cores = os.cpu_count() or 1
    rows = []
    for model in models:
        source = dict(mnist=tuple(map(str, MNIST))) if model == "mnist" else dict(photos=str(args.photos))
        for parallel in sorted({1, cores}):
            for batch in batches:
                r = kafray.raw_limit(model, batch_size=batch, parallel=parallel, threads=args.threads,
                                     seconds=args.raw_seconds, **source)
                rows.append({"model": model, "parallel": parallel, "batch_size": batch,
                             "images_per_s": round(r["images_per_s"], 1),
                             "decode_ms_per_image": round(r["decode_ms_per_image"], 4),
                             "infer_ms_per_image": round(r["infer_ms_per_image"], 4)})
                print(f"raw  {model:<13} threads {parallel:>2} batch {batch:>2}: {r['images_per_s']:>8.0f} img/s",
                      flush=True)
    return rows


def attach_ratios(rows: list[dict], raw: list[dict]) -> None:
    """Adds raw_images_per_s / of_raw, cpu_efficiency and kafray_over_peer. The limit is the best raw
    throughput on every core at any batch size: a worker's real batch can differ from the asked one,
    and on CPUs a bigger batch is not always faster per image. CPU efficiency is images per worker
    CPU second over one raw thread's rate at the same batch: the share of a worker's CPU that
    went to decoding and inference rather than to Kafka, hand-offs and Ray."""
    cores = os.cpu_count() or 1
    limit, single = {}, {}
    for r in raw:
        if int(r["parallel"]) == cores:
            limit[r["model"]] = max(limit.get(r["model"], 0.0), float(r["images_per_s"]))
        if int(r["parallel"]) == 1:
            single[(r["model"], int(r["batch_size"]))] = float(r["images_per_s"])
    by_cell = {(r["system"], r["model"], int(r["workers"]), int(r["batch_size"])): r for r in rows}
    for r in rows:
        lim = limit.get(r["model"])
        r["raw_images_per_s"] = lim if lim is not None else ""
        r["of_raw"] = round(float(r["images_per_s"]) / lim, 3) if lim else ""
        one = single.get((r["model"], int(r["batch_size"])))
        r["cpu_efficiency"] = (round(float(r["images_per_cpu_s"]) / one, 3)
                               if one and r.get("images_per_cpu_s") not in (None, "") else "")
        other = by_cell.get(("peer", r["model"], int(r["workers"]), int(r["batch_size"])))
        r["kafray_over_peer"] = (round(float(r["images_per_s"]) / float(other["images_per_s"]), 2)
                                 if r["system"] == "kafray" and other else "")


def plot(out: Path, rows: list[dict], raw: list[dict], meta: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cores = meta["machine"]["cores"]
    written = []
    models = sorted({r["model"] for r in rows}, key=lambda m: m != "mnist")
    batches = sorted({int(r["batch_size"]) for r in rows})
    workers = sorted({int(r["workers"]) for r in rows})
    colors = dict(zip(batches, plt.cm.viridis([i / max(1, len(batches) - 1) * 0.9 for i in range(len(batches))])))
    for model in models:
        present = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
        fig, axes = plt.subplots(1, len(present), figsize=(5.5 * len(present) + 1, 4.2), sharey=True, squeeze=False)
        axes = axes[0]
        for ax, system in zip(axes, present):
            for b in batches:
                pts = sorted((int(r["workers"]), float(r["images_per_s"])) for r in rows
                             if r["model"] == model and r["system"] == system and int(r["batch_size"]) == b)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colors[b], label=f"batch {b}")
            lim = max(float(r["images_per_s"]) for r in raw if r["model"] == model and int(r["parallel"]) == cores)
            ax.axhline(lim, ls=":", color="grey", label=f"raw limit, {cores} cores (no Kafka, no Ray)")
            ax.set_title(f"{'kafray (Rust worker)' if system == 'kafray' else 'Python peer (confluent-kafka + onnxruntime)'}",
                         fontsize=10)
            ax.set_xlabel("workers (Ray actors)")
            ax.set_xticks(workers)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("images / s")
        axes[0].set_ylim(bottom=0)
        axes[-1].legend(fontsize=8, loc="best")
        note = f", {meta['note']}" if meta.get("note") else ""
        fig.suptitle(f"{MODEL_TITLES.get(model, model)}: throughput vs workers\n"
                     f"{cores} cores, profile {meta['profile']}{note}", fontsize=11)
        fig.tight_layout()
        path = out / f"fig9_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if not any(r["kafray_over_peer"] != "" for r in rows):
        return written  # one system only (--systems): no ratios to draw
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        grid = [[next((float(r["kafray_over_peer"]) for r in rows if r["model"] == model and r["system"] == "kafray"
                       and int(r["workers"]) == w and int(r["batch_size"]) == b and r["kafray_over_peer"] != ""),
                      float("nan")) for w in workers] for b in batches]
        top = max(2.0, max(v for g in grid for v in g if v == v))
        norm = matplotlib.colors.TwoSlopeNorm(vmin=0, vcenter=1, vmax=top)
        im = ax.imshow(grid, cmap="RdYlGn", norm=norm, origin="lower")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(workers)), workers)
        ax.set_yticks(range(len(batches)), batches)
        ax.set_xlabel("workers")
        ax.set_ylabel("batch size")
        ax.set_title(f"kafray / peer images/s: {model}", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    path = out / "ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def tables(rows: list[dict], raw: list[dict], meta: dict) -> str:
    """The results as Markdown tables (pasted into bench/RESULTS.md), computed from one run."""
    cores = meta["machine"]["cores"]
    cell = {(r["system"], r["model"], int(r["workers"]), int(r["batch_size"])): r for r in rows}
    lines = [f"Profile `{meta['profile']}`, {meta['started']}, {meta['machine']['cpu']} ({cores} cores), "
             f"{meta['broker']}; command `{meta['command']}`."
             + (f" {meta['note'][0].upper()}{meta['note'][1:]}." if meta.get("note") else ""), ""]
    for model in sorted({r["model"] for r in rows}, key=lambda m: m != "mnist"):
        keys = sorted({(w, b) for (_, m, w, b) in cell if m == model})
        pairs = [(cell.get(("kafray", model, w, b)), cell.get(("peer", model, w, b))) for w, b in keys]
        ratios = [float(k["images_per_s"]) / float(p["images_per_s"]) for k, p in pairs if k and p]
        of_raw = {s: [float(r["of_raw"]) for r in rows if r["model"] == model and r["system"] == s and r["of_raw"]]
                  for s in SYSTEMS}
        span = lambda v: f"{min(v):.2f}-{max(v):.2f}" if v else "-"  # noqa: E731
        versus = (f"kafray/peer: geometric mean **{_geomean(ratios):.2f}** (range {span(ratios)}); " if ratios
                  else "one system only; ")
        lines += [f"**{MODEL_TITLES.get(model, model)}** ({meta_frames(rows, model)} frames per cell). "
                  f"{versus}of the raw limit: kafray {span(of_raw['kafray'])}, peer {span(of_raw['peer'])}.", "",
                  "| workers | batch | kafray img/s | peer img/s | raw limit | kafray/peer | kafray/raw | peer/raw "
                  "| p50 / p99 ms kafray | p50 / p99 ms peer | mean batch k / p | CPU cores k / p |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (w, b), (k, p) in zip(keys, pairs):
            if not (k and p):
                one, system = (k, "kafray") if k else (p, "peer")
                lines.append(f"| {w} | {b} | {system} only: {float(one['images_per_s']):.0f} img/s, p50 / p99 "
                             f"{one['latency_ms_p50']} / {one['latency_ms_p99']} ms, mean batch "
                             f"{float(one['mean_batch']):.1f} |" + " |" * 9)
                continue
            lines.append(
                f"| {w} | {b} | {float(k['images_per_s']):.0f} | {float(p['images_per_s']):.0f} | "
                f"{float(k['raw_images_per_s']):.0f} | **{float(k['images_per_s']) / float(p['images_per_s']):.2f}** | "
                f"{float(k['of_raw']):.2f} | {float(p['of_raw']):.2f} | {k['latency_ms_p50']} / {k['latency_ms_p99']} | "
                f"{p['latency_ms_p50']} / {p['latency_ms_p99']} | {float(k['mean_batch']):.1f} / "
                f"{float(p['mean_batch']):.1f} | {float(k['worker_cpu_cores']):.2f} / {float(p['worker_cpu_cores']):.2f} |")
        lines.append("")
    lines += ["**Where the time goes**: thread time per image, ms, summed over the workers (kafray: intake thread "
              "poll / decode / handoff, inference thread idle / infer / produce; the peer has one thread: poll / "
              "decode / infer / produce). Raw: one thread, no Kafka.", "",
              "| model | system | workers | batch | poll (wait) | decode | handoff (wait) | idle (wait) | infer | produce |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['system']} | {r['workers']} | {r['batch_size']} | "
                     + " | ".join(f"{float(r[f'{k}_ms_per_image']):.3f}" if r["system"] == "kafray" or k in
                                  ("poll", "decode", "infer", "produce") else "-" for k in STAGES) + " |")
    for r in raw:
        if int(r["parallel"]) == 1:
            lines.append(f"| {r['model']} | raw | - | {r['batch_size']} | - | {float(r['decode_ms_per_image']):.3f} "
                         f"| - | - | {float(r['infer_ms_per_image']):.3f} | - |")
    if any(r.get("cpu_efficiency") not in (None, "") for r in rows):
        lines += ["", "**CPU efficiency**: images per worker CPU second over one raw thread's rate at the same "
                  "batch, and where the workers' CPU went (cores, by thread: kafray's intake and inference "
                  "threads, librdkafka's threads, and the actor's Python and Ray threads).", "",
                  "| model | system | workers | batch | mean batch | img / CPU s | raw 1 thread img/s | efficiency "
                  "| intake | infer | librdkafka | other |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        single = {(r["model"], int(r["batch_size"])): float(r["images_per_s"]) for r in raw if int(r["parallel"]) == 1}
        for r in rows:
            if r.get("cpu_efficiency") in (None, ""):
                continue
            lines.append(f"| {r['model']} | {r['system']} | {r['workers']} | {r['batch_size']} | "
                         f"{float(r['mean_batch']):.1f} | {float(r['images_per_cpu_s']):.0f} | "
                         f"{single[(r['model'], int(r['batch_size']))]:.0f} | **{float(r['cpu_efficiency']):.2f}** | "
                         + " | ".join(f"{float(r[f'cpu_{c}_cores']):.2f}" for c in CPU_CLASSES) + " |")
    return "\n".join(lines) + "\n"


def meta_frames(rows: list[dict], model: str) -> str:
    return next(r["frames"] for r in rows if r["model"] == model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="short")
    p.add_argument("--models", default="mnist,mobilenet_v2", help="comma list of mnist, mobilenet_v2")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of kafray, peer")
    p.add_argument("--workers", help="comma list (default: the profile's)")
    p.add_argument("--batches", help="comma list (default: the profile's)")
    p.add_argument("--frames", type=int, help="frames per cell (default: the profile's, per model)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per worker, both systems")
    p.add_argument("--max-wait-ms", type=int, default=20, help="a partial batch is sent after this long")
    p.add_argument("--device", default="cpu",
                   help="kafray workers' device: cpu, or cuda (the workers share GPU 0; needs "
                        "`scripts/setup.sh --gpu` and its ORT_DYLIB_PATH). The peer stays on the CPU")
    p.add_argument("--raw-seconds", type=float, help="seconds per raw-limit measurement (short 2, full 3)")
    p.add_argument("--photos", type=Path, default=PHOTOS)
    p.add_argument("--brokers", help="a Kafka cluster to use (default: a local Tansu broker, in memory)")
    p.add_argument("--address", help="a Ray cluster to join (default: a local one, with as many CPUs as the most "
                   "workers, on this machine's cores)")
    p.add_argument("--out", type=Path, help="folder for the results (default: bench/results/sweep-<profile>)")
    p.add_argument("--poll-s", type=float, default=0.1,
                   help="how often the driver asks the actors whether a cell is done (each ask costs them CPU)")
    p.add_argument("--verbose", "-v", action="store_true", help="print where each cell's time goes")
    p.add_argument("--plot-only", action="store_true", help="redraw the charts from the CSVs in --out")
    p.add_argument("--note", help="what sets this run apart (e.g. the network), for run.json and the charts' titles")
    args = p.parse_args(argv)
    prof = PROFILES[args.profile]
    out = args.out or ROOT / f"bench/results/sweep-{args.profile}"
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        meta = json.loads((out / "run.json").read_text())
        rows, raw = read_csv(out / "sweep.csv"), read_csv(out / "raw.csv")
        for path in plot(out, rows, raw, meta):
            print(f"wrote {path}")
        (out / "tables.md").write_text(tables(rows, raw, meta))
        return 0

    models = [m for m in args.models.split(",") if m]
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in SYSTEMS:
            p.error(f"--systems: {s!r} is not one of {', '.join(SYSTEMS)}")
    for m in models:
        if m not in prof["frames"]:
            p.error(f"--models: {m!r} is not one of {', '.join(prof['frames'])}")
    workers = [int(x) for x in args.workers.split(",")] if args.workers else prof["workers"]
    batches = [int(x) for x in args.batches.split(",")] if args.batches else prof["batches"]
    if min(workers) < 1 or min(batches) < 1:
        p.error("--workers and --batches take positive integers")
    if not CLI.is_file():
        p.error(f"{CLI} is missing: run `cargo build --release` first")
    if "mobilenet_v2" in models and not args.photos.is_dir():
        p.error(f"--photos {args.photos}: no such folder (the photos of ../shared/assets/images)")
    raw_seconds = args.raw_seconds or (2.0 if args.profile == "short" else 3.0)
    args.raw_seconds = raw_seconds
    # Every worker count of the sweep divides the partition count, so each worker owns an equal share.
    partitions = math.lcm(*workers)
    if partitions > 48:
        partitions = max(workers)
    os.chdir(ROOT)  # the CLI finds models and MNIST relative to the checkout

    began = time.time()
    meta = {"profile": args.profile, "command": " ".join([".venv/bin/python", "-m", "bench.sweep", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(), "partitions": partitions,
            "threads_per_worker": args.threads, "max_wait_ms": args.max_wait_ms, "note": args.note}
    print(f"sweep {args.profile}: {models} x workers {workers} x batch {batches} x {systems}", flush=True)

    raw = raw_limits(models, batches, workers, args)
    write_csv(out / "raw.csv", raw)

    with cluster(args.brokers, args.address, max(workers)) as (brokers, meta["broker"]):
        meta["ray_cpus"] = ray.cluster_resources().get("CPU")
        run_id = str(int(began))
        rows = []
        for model in models:
            frames = args.frames or prof["frames"][model]
            for w in workers:
                for system in systems:
                    pool = Pool(system, w, model, args.threads, args.device)
                    try:
                        for b in batches:
                            row = run_cell(pool, system, model, w, b, frames, args, run_id, brokers, partitions)
                            rows.append(row)
                            print(f"{system:<6} {model:<13} w{w:>2} b{b:>2}: {row['images_per_s']:>8.0f} img/s  "
                                  f"p50 {row['latency_ms_p50']} ms p99 {row['latency_ms_p99']} ms  "
                                  f"batch {row['mean_batch']:.1f}  cpu {row['worker_cpu_cores']:.2f}", flush=True)
                            write_csv(out / "sweep.csv", rows)
                    finally:
                        pool.close()
    attach_ratios(rows, raw)
    write_csv(out / "sweep.csv", rows)
    meta["seconds"] = round(time.time() - began, 1)
    (out / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    for path in plot(out, rows, raw, meta):
        print(f"wrote {path}")
    (out / "tables.md").write_text(tables(rows, raw, meta))
    print(f"wrote {out / 'tables.md'}, {out / 'sweep.csv'}, {out / 'raw.csv'} in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
