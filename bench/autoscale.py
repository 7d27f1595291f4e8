"""Autoscaling under a burst: workers, lag and rate over time.

    .venv/bin/python -m bench.autoscale                  # about 2.5 minutes here
    .venv/bin/python -m bench.autoscale --burst-rate 300 --burst-s 30

A local Ray cluster (one node, 4 CPUs), an in-memory Tansu broker and a kafray deployment
started with `--autoscale 1:MAX --lag-threshold T` (MobileNetV2 on camera photos, one CPU per
worker). `kafray produce camera` sends a quiet rate, then a burst, then the quiet rate again.
The deployment's controller decides every 2 s; its history is the record. `kafray eval` then
reads every prediction back: nothing may be lost across the rescales.

Writes to --out: history.csv (one row per controller turn), summary.json and autoscale.png
(workers and desired workers, lag, and predicted rate against time, the burst shaded).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import ray

import kafray
from kafray import ray as kray

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "target" / "release" / "kafray"
PHOTOS = ROOT.parent / "shared" / "assets" / "images"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quiet-rate", type=float, default=10.0, help="frames/s before and after the burst")
    p.add_argument("--burst-rate", type=float, default=250.0, help="frames/s in the burst")
    p.add_argument("--quiet-s", type=float, default=20.0)
    p.add_argument("--burst-s", type=float, default=25.0)
    p.add_argument("--after-s", type=float, default=60.0, help="quiet seconds after the burst")
    p.add_argument("--max-workers", type=int, default=3)
    p.add_argument("--lag-threshold", type=int, default=200)
    p.add_argument("--upscale-delay-s", type=float, default=2.0)
    p.add_argument("--downscale-delay-s", type=float, default=20.0)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "autoscale"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    broker = kafray.EmbeddedBroker("memory")
    ray.init(num_cpus=args.max_workers + 1, namespace=kray.NAMESPACE, log_to_driver=False, logging_level="WARNING",
             include_dashboard=False)
    autoscale = dict(min_workers=1, max_workers=args.max_workers, lag_threshold=args.lag_threshold,
                     upscale_delay_s=args.upscale_delay_s, downscale_delay_s=args.downscale_delay_s)
    d = kray.Deployment.start(1, name="bench-autoscale", address=None, brokers=broker.bootstrap,
                              create_topics=args.partitions, model="mobilenet_v2", status_interval_s=1,
                              autoscale=autoscale)
    try:
        schedule = f"{args.quiet_rate:g}:{args.quiet_s:g},{args.burst_rate:g}:{args.burst_s:g},{args.quiet_rate:g}:{args.after_s:g}"
        total_s = args.quiet_s + args.burst_s + args.after_s
        began = time.time()
        produced = subprocess.run([str(CLI), "produce", "camera", str(PHOTOS), "--brokers", broker.bootstrap,
                                   "--size", "224", "--fps", "10000", "--schedule", schedule, "--duration",
                                   f"{total_s:g}", "--partitions", str(args.partitions), "--round-robin", "-q"],
                                  capture_output=True, text=True, cwd=ROOT)
        if produced.returncode != 0:
            sys.exit(f"produce failed: {produced.stderr}")
        n = int(produced.stderr.split("published ")[1].split()[0])
        # Quiet until the controller has scaled back to 1 (or 3 downscale delays have passed).
        deadline = time.monotonic() + 3 * args.downscale_delay_s + 30
        while time.monotonic() < deadline:
            history = ray.get(d.controller().get_history.remote())
            if history and history[-1]["workers"] == 1 and max(r["workers"] for r in history) > 1:
                break
            time.sleep(2)
        report = json.loads(subprocess.run([str(CLI), "eval", "--brokers", broker.bootstrap, "--topic", "predictions",
                                            "--expect", str(n), "--timeout", "120", "--json"],
                                           capture_output=True, text=True, cwd=ROOT).stdout)
        history = ray.get(d.controller().get_history.remote())
    finally:
        d.stop()
        ray.shutdown()
        broker.stop()

    rows = [{"t_s": round(r["t"] - began, 2), "workers": r["workers"], "desired": r.get("desired"),
             "lag": r["lag"], "rate": None if r["rate"] is None else round(r["rate"], 1),
             "action": r.get("action"), "reason": r.get("reason")} for r in history]
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = {"command": " ".join(sys.argv), "schedule": schedule, "produced": n,
               "distinct_predicted": report["distinct_frames"], "lost": n - report["distinct_frames"],
               "duplicates": report["duplicates"], "max_workers_reached": max(r["workers"] for r in rows),
               "final_workers": rows[-1]["workers"],
               "decisions": [r for r in rows if r["action"] in ("up", "down")], "autoscale": autoscale,
               "latency_ms_p50": report["latency_ms_p50"], "latency_ms_p99": report["latency_ms_p99"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    chart(rows, args, out / "autoscale.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "decisions"}, indent=2))
    return 0 if summary["lost"] == 0 else 1


def chart(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] for r in rows]
    fig, (a, b, c) = plt.subplots(3, 1, sharex=True, figsize=(9, 8))
    for ax in (a, b, c):
        ax.axvspan(args.quiet_s, args.quiet_s + args.burst_s, color="orange", alpha=0.15, label="burst")
    a.step(t, [r["workers"] for r in rows], where="post", label="workers")
    a.step(t, [r["desired"] for r in rows], where="post", linestyle="--", label="desired")
    a.set_ylabel("workers")
    a.set_ylim(0, args.max_workers + 0.5)
    a.legend(loc="upper right")
    b.plot(t, [r["lag"] if r["lag"] is not None else float("nan") for r in rows], label="total lag")
    b.axhline(args.lag_threshold, color="grey", linestyle=":", label=f"lag threshold {args.lag_threshold}")
    b.set_ylabel("lag (frames)")
    b.legend(loc="upper right")
    c.plot(t, [r["rate"] if r["rate"] is not None else float("nan") for r in rows], label="predicted")
    c.axhline(args.burst_rate, color="grey", linestyle=":", label=f"burst rate {args.burst_rate:g}/s")
    c.set_ylabel("frames/s")
    c.set_xlabel("seconds since the stream started")
    c.legend(loc="upper right")
    a.set_title(f"kafray-ray --autoscale 1:{args.max_workers} --lag-threshold {args.lag_threshold} "
                f"(up after {args.upscale_delay_s:g} s, down after {args.downscale_delay_s:g} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
