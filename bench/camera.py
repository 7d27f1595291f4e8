"""Camera-size frames: one worker's throughput, and where its time goes, as the frames grow from
the 455x256 photos of the other benchmarks to what cameras send (640x480, 1280x720, 1920x1080
JPEG), for MobileNetV2 and for a deliberately cheap model (`pool_linear`: an average pool and a
linear layer, about 0.04 ms an image, standing in for a model on a GPU), kafray against the Python
peer (`bench/peer.py`, which uses Pillow's `draft` on JPEGs), in one run.

    .venv/bin/python -m bench.camera                 # about 10 minutes on 2 cores

kafray runs with each of `--decode-threads` (1: the polling thread decodes; 2: a pool of two
decode threads while it polls); `kafray-before` is kafray as it was before issue 21 (`BEFORE`).

Each cell is the sweep's (bench/sweep.py, `run_cell`, as a backlog): fresh topics, the frames
published first, then one worker as a Ray actor (one CPU) drains them; throughput from its first
prediction to its last (so the producer, which makes each camera frame as it goes, does not cap
the cheap model), and the worker's time per image in each stage.
Results go to `--out`: `camera.csv`, `run.json`, `tables.md` and the chart `camera.png`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import kafray

from bench.harness import PHOTOS, ROOT, CLI, Pool, cluster, machine, read_csv, write_csv
from bench.sweep import run_cell

SIZES = ("455x256", "640x480", "1280x720", "1920x1080")
MODELS = ("mobilenet_v2", "pool_linear")
SYSTEMS = ("kafray", "kafray-before", "peer")
# kafray as it was before issue 21, in the same run: every JPEG decoded in full (`jpeg_draft = false`
# in a TOML beside a copy of the model), on the polling thread, with librdkafka's own 1 s
# fetch.queue.backoff.ms.
BEFORE = {"decode_threads": 1, "kafka": [["fetch.queue.backoff.ms", "1000"]]}


def full_decode_copy(model: str, folder: Path) -> str:
    """A copy of `model` (with its labels) whose TOML turns the scaled JPEG decode off."""
    import shutil

    src = Path(kafray.find_model(model))
    for f in [src, src.with_name("imagenet_classes.txt")]:
        if f.is_file():
            shutil.copy(f, folder / f.name)
    (folder / src.with_suffix(".toml").name).write_text("jpeg_draft = false\n")
    return str(folder / src.name)


def plot(out: Path, rows: list[dict], meta: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        ax = axes[0][col]
        for system, label, style in [("kafray", f"kafray, {d} decode thread(s)", "o-" if d == "1" else "D-")
                                     for d in decoders(rows)] + [("kafray-before", "kafray before (full decode, 1 s "
                                                                  "fetch backoff)", "x:"), ("peer", "peer (Pillow draft)", "s--")]:
            pts = [(s, float(r["images_per_s"])) for s in SIZES for r in rows
                   if r["model"] == model and r["system"] == system and r["size"] == s
                   and (system != "kafray" or f"{r['decode_threads']} decode" in label)]
            if pts:
                ax.plot([SIZES.index(s) for s, _ in pts], [v for _, v in pts], style, label=label)
        ax.set_xticks(range(len(SIZES)), SIZES)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("images / s, 1 worker")
        ax.set_title(Path(model).stem if "/" in model else model, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[1][col]
        most = decoders(rows)[-1]
        kafray_rows = [r for s in SIZES for r in rows if r["model"] == model and r["system"] == "kafray"
                       and r["size"] == s and r["decode_threads"] == most]
        bottom = [0.0] * len(kafray_rows)
        for stage in ("decode", "infer", "produce", "poll"):
            vals = [float(r[f"{stage}_ms_per_image"]) for r in kafray_rows]
            ax.bar(range(len(vals)), vals, bottom=bottom, label=stage)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(kafray_rows)), [r["size"] for r in kafray_rows])
        ax.set_ylabel(f"kafray ({most} decode threads): thread time per image, ms")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(f"Camera-size JPEG frames, 1 worker, {meta['machine']['cores']} cores, batch {meta['batch']}",
                 fontsize=11)
    fig.tight_layout()
    path = out / "camera.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def decoders(rows: list[dict]) -> list[str]:
    """The decode-thread counts kafray ran with, fewest first."""
    return sorted({r["decode_threads"] for r in rows if r["system"] == "kafray"}, key=int)


def tables(rows: list[dict], meta: dict) -> str:
    cell = {(r["system"], r["model"], r["size"], r["decode_threads"]): r for r in rows}
    lines = [f"{meta['started']}, {meta['machine']['cpu']} ({meta['machine']['cores']} cores), command "
             f"`{meta['command']}`, {meta['frames']} frames per cell, batch {meta['batch']}.", "",
             "| model | size | decode threads | kafray img/s | of its 455x256 rate | of 1 decode thread | of before "
             "| peer img/s | kafray/peer | decode ms | infer ms | produce ms | p50 / p99 ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def ratio(r: dict, other: dict | None) -> str:
        return f"{float(r['images_per_s']) / float(other['images_per_s']):.2f}" if other else "-"

    def line(model: str, size: str, label: str, r: dict, ratios: list[str], peer: dict | None, bold: bool) -> str:
        vs_peer = f"**{ratio(r, peer)}**" if bold else ratio(r, peer)
        return (f"| {model} | {size} | {label} | {float(r['images_per_s']):.0f} | {' | '.join(ratios)} | "
                + (f"{float(peer['images_per_s']):.0f} | {vs_peer} | " if peer else "- | - | ")
                + f"{float(r['decode_ms_per_image']):.2f} | {float(r['infer_ms_per_image']):.2f} | "
                f"{float(r['produce_ms_per_image']):.2f} | {r['latency_ms_p50']} / {r['latency_ms_p99']} |")

    for model in dict.fromkeys(r["model"] for r in rows):
        for size in SIZES:
            p, before = cell.get(("peer", model, size, "-")), cell.get(("kafray-before", model, size, "1"))
            if before:
                lines.append(line(model, size, "before", before, ["-", "-", "1.00"], p, bold=False))
            for d in decoders(rows):
                k = cell.get(("kafray", model, size, d))
                if k:
                    base, one = cell.get(("kafray", model, SIZES[0], d)), cell.get(("kafray", model, size, "1"))
                    lines.append(line(model, size, d, k, [ratio(k, base), ratio(k, one), ratio(k, before)], p, bold=True))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help="built-in names or .onnx paths (e.g. a copy with jpeg_draft = false in its TOML)")
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--frames", type=int, default=1000, help="frames per cell")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--max-wait-ms", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--decode-threads", default="1,2", help="kafray's decode_threads, one run of each")
    p.add_argument("--photos", type=Path, default=PHOTOS)
    p.add_argument("--brokers")
    p.add_argument("--address")
    p.add_argument("--poll-s", type=float, default=0.1)
    p.add_argument("--verbose", "-v", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/camera")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        meta = json.loads((args.out / "run.json").read_text())
        rows = read_csv(args.out / "camera.csv")
        print(f"wrote {plot(args.out, rows, meta)}")
        (args.out / "tables.md").write_text(tables(rows, meta))
        return 0
    if not CLI.is_file():
        p.error(f"{CLI} is missing: run `cargo build --release` first")
    models, sizes, systems = (a.split(",") for a in (args.models, args.sizes, args.systems))
    began = time.time()
    meta = {"command": " ".join([".venv/bin/python", "-m", "bench.camera", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(), "frames": args.frames,
            "batch": args.batch}
    with cluster(args.brokers, args.address, 1) as (brokers, meta["broker"]):
        rows = []
        copies = tempfile.TemporaryDirectory()
        for model in models:
            for system in systems:
                before = system == "kafray-before"
                pool = Pool("kafray" if before else system, 1,
                            full_decode_copy(model, Path(copies.name)) if before else model, args.threads)
                try:
                    for size in sizes:
                        for d in (args.decode_threads.split(",") if system == "kafray" else ["1"] if before else ["-"]):
                            settings = BEFORE if before else {"decode_threads": int(d)} if system == "kafray" else {}
                            row = run_cell(pool, system, model, 1, args.batch, args.frames, args,
                                           str(int(began)), brokers, 1, size, settings, backlog=True)
                            row["size"], row["decode_threads"] = size, d
                            rows.append(row)
                            print(f"{system:<6} {model:<13} {size:>9} decode threads {d}: {row['images_per_s']:>7.0f} "
                                  f"img/s  decode {row['decode_ms_per_image']:.2f} ms  infer "
                                  f"{row['infer_ms_per_image']:.2f} ms", flush=True)
                            write_csv(args.out / "camera.csv", rows)
                finally:
                    pool.close()
    meta["seconds"] = round(time.time() - began, 1)
    (args.out / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {plot(args.out, rows, meta)}")
    (args.out / "tables.md").write_text(tables(rows, meta))
    print((args.out / "tables.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
