"""Chaos soak: a paced stream through a Ray deployment and plain workers while a driver kills
workers, restarts the broker, scales the deployment and injects hostile frames; then an invariant
checker reads every topic back.

    .venv/bin/python -m bench.soak --minutes 10      # the full soak (bench/results/soak/)
    .venv/bin/python -m bench.soak --minutes 2       # a short one

One consumer group shares the input partitions between `--ray-workers` Ray actors and
`--plain-workers` `kafray worker` processes, against a local broker with SQLite storage (so a
killed broker keeps what it acknowledged). `kafray produce` paces MNIST digits at `--rate`
frames/s. Every `--every` seconds the driver does one of, in turn:

- kill -9 a plain worker, and start a new one in its place;
- kill -9 a Ray actor's process (Ray restarts it: a static member, with the same name);
- kill -9 the broker and restart it on the same storage;
- scale the deployment up by one, or back down;
- inject the hostile frames: empty, truncated PNG, a PNG declaring 60000x60000, a JPEG declaring
  65000x65000, raw frames with a wrong and an absurd shape, non-UTF-8 headers, and a frame at the
  producer's size limit.

At the end the stream stops, the workers drain, and the checker reads the input, output and
dead-letter topics: lost frames (a frame with neither a prediction nor a dead letter: must be 0),
duplicates against their bound (per worker disrupted by a kill, a broker restart or a scale:
`--max-in-flight` plus one second's commit interval of results), every hostile frame predicted or dead-lettered with a
reason, and each worker's RSS over time. Results: soak.json, events.csv, rss.csv and rss.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import ray

import kafray
from kafray import ray as kray

from bench.harness import CLI, ROOT, create_topics

TOPIC, OUT, DLQ = "frames", "predictions", "frames.dlq"
GROUP = "soak"
# A value that, with its key and kafray's headers, fits the producer's 1,000,000-byte
# message.max.bytes, and whose dead letter (reason headers added) does not.
AT_LIMIT = 999_900


def png_declaring(width: int, height: int) -> bytes:
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def jpeg_declaring(side: int) -> bytes:
    sof = struct.pack(">BHHB", 8, side, side, 3) + bytes([1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1])
    return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def hostile_frames(round_no: int) -> list[tuple[str, bytes, list[tuple[str, bytes]]]]:
    """(key, value, headers): each must end up dead-lettered with a reason (or predicted)."""
    png = (ROOT.parent / "shared/assets/images/chelsea.png").read_bytes()
    k = f"hostile-{round_no}"
    raw = ("kafray.format", b"raw")
    return [
        (f"{k}-empty", b"", []),
        (f"{k}-truncated-png", png[: len(png) // 3], []),
        (f"{k}-png-60000", png_declaring(60_000, 60_000), []),
        (f"{k}-jpeg-65000", jpeg_declaring(65_000), []),
        (f"{k}-wrong-shape", bytes(9), [raw, ("kafray.shape", b"3x3x1")]),
        (f"{k}-absurd-shape", bytes(12), [raw, ("kafray.shape", b"18446744073709551615x2x3")]),
        (f"{k}-non-utf8-headers", bytes(784), [("kafray.format", b"\xff\xfe\xfd"), ("kafray.shape", b"\xc3\x28")]),
        (f"{k}-at-the-limit", bytes(AT_LIMIT), []),
    ]


class Plain:
    """A `kafray worker` process."""

    def __init__(self, brokers: str, name: str, max_in_flight: int):
        self.name = name
        self.proc = subprocess.Popen(
            [str(CLI), "worker", "-b", brokers, "--group", GROUP, "--worker-id", name, "--status-interval", "5",
             "--max-in-flight", str(max_in_flight)],
            stdout=subprocess.DEVNULL, stderr=open(Path(os.environ["SOAK_OUT"]) / f"{name}.log", "ab"), cwd=ROOT)


def rss_mib(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def read_all(brokers: str, topic: str) -> list:
    """Every record of `topic`, from the beginning to the end as it is now."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": brokers, "group.id": "soak-checker", "enable.auto.commit": False,
                  "fetch.max.bytes": 64 * 2**20})
    md = c.list_topics(topic, timeout=30).topics[topic]
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in md.partitions}
    c.assign([TopicPartition(topic, p, 0) for p in md.partitions])
    left = {p: e for p, e in ends.items() if e > 0}
    out = []
    deadline = time.monotonic() + 600
    while left and time.monotonic() < deadline:
        for m in c.consume(1000, timeout=1.0):
            if m.error():
                continue
            out.append(m)
            if m.offset() + 1 >= ends[m.partition()]:
                left.pop(m.partition(), None)
    c.close()
    if left:
        raise RuntimeError(f"could not read {topic} to its end: {left}")
    return out


def check(brokers: str, injected: list[str], disruptions: int, max_in_flight: int, rate: int) -> dict:
    frames = read_all(brokers, TOPIC)
    predictions = read_all(brokers, OUT)
    dead = read_all(brokers, DLQ)
    keys = {(m.partition(), m.offset()): (m.key() or b"").decode(errors="replace") for m in frames}
    answered: dict[tuple[int, int], int] = {}
    for m in predictions:
        p = json.loads(m.value())
        answered[(p["partition"], p["offset"])] = answered.get((p["partition"], p["offset"]), 0) + 1
    reasons: dict[tuple[int, int], str] = {}
    for m in dead:
        h = {k: v.decode(errors="replace") for k, v in (m.headers() or [])}
        src = (int(h["kafray.source.partition"]), int(h["kafray.source.offset"]))
        reasons[src] = h.get("kafray.error", "")
    lost = [f for f in keys if f not in answered and f not in reasons]
    duplicates = sum(n - 1 for n in answered.values())
    hostile = {}
    for frame, key in keys.items():
        if key.startswith("hostile-"):
            hostile[key] = ("predicted" if frame in answered else f"dead-lettered: {reasons[frame]}"
                            if frame in reasons else "LOST")
    missing = [k for k in injected if k not in hostile]
    return {
        "frames": len(keys), "predicted_frames": len(answered), "dead_lettered_frames": len(reasons),
        "lost": len(lost), "lost_examples": lost[:10], "duplicates": duplicates,
        # Each worker disrupted (killed, or rebalanced by a broker restart or a scale) may re-deliver
        # what it had in flight, plus results acknowledged within one auto-commit interval (1 s).
        "duplicate_bound": disruptions * (max_in_flight + rate),
        "hostile": hostile, "hostile_not_found": missing,
        "hostile_without_reason": [k for k, v in hostile.items() if v == "LOST" or v == "dead-lettered: "],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=300, help="frames/s")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--ray-workers", type=int, default=2)
    p.add_argument("--plain-workers", type=int, default=1)
    p.add_argument("--every", type=float, default=15.0, help="seconds between chaos events")
    p.add_argument("--max-in-flight", type=int, default=200)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/soak")
    args = p.parse_args(argv)
    if not CLI.is_file():
        p.error(f"{CLI} is missing: run `cargo build --release` first")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["SOAK_OUT"] = str(args.out)
    for old in args.out.glob("*.log"):
        old.unlink()
    from confluent_kafka import Producer

    broker = kafray.EmbeddedBroker("sqlite")
    b = broker.bootstrap
    create_topics(b, [(TOPIC, args.partitions), (OUT, args.partitions), (DLQ, 1)])
    ray.init(num_cpus=args.ray_workers + 2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             object_store_memory=256 * 2**20, namespace=kray.NAMESPACE)
    began = time.monotonic()
    events: list[dict] = []
    rss: list[dict] = []

    def log(kind: str, detail: str = "") -> None:
        events.append({"t_s": round(time.monotonic() - began, 1), "event": kind, "detail": detail})
        print(f"[{events[-1]['t_s']:>6}] {kind} {detail}", flush=True)

    d = kray.Deployment.start(args.ray_workers, name="soak", address=None, brokers=b, group=GROUP,
                              max_in_flight=args.max_in_flight, max_restarts=-1)
    plain = [Plain(b, f"plain-{i}", args.max_in_flight) for i in range(args.plain_workers)]
    n = int(args.rate * args.minutes * 60)
    producer = subprocess.Popen(
        [str(CLI), "produce", "-b", b, "-n", str(n), "--rate", str(args.rate), "--round-robin", "-q",
         "mnist", "--repeat", str(-(-n // 10000))], cwd=ROOT)
    log("stream", f"{n} frames at {args.rate}/s")
    injected: list[str] = []
    kills = 0
    # Worker-disruptions: each may re-deliver what that worker had in flight.
    disruptions = 0
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(5.0):
            t = round(time.monotonic() - began, 1)
            for w in plain:
                v = rss_mib(w.proc.pid)
                if v:
                    rss.append({"t_s": t, "worker": w.name, "rss_mib": round(v, 1)})
            try:
                for s in d.workers():
                    if s.get("pid") and (v := rss_mib(s["pid"])):
                        rss.append({"t_s": t, "worker": s["actor"], "rss_mib": round(v, 1)})
            except Exception:
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    actions = ["kill-plain", "inject", "kill-actor", "restart-broker", "scale", "inject"]
    step = 0
    scaled_up = False
    deadline = began + args.minutes * 60
    try:
        while time.monotonic() + args.every < deadline and producer.poll() is None:
            time.sleep(args.every)  # the chaos schedule: one event every --every seconds
            action = actions[step % len(actions)]
            step += 1
            if action == "kill-plain" and plain:
                w = plain.pop(0)
                w.proc.send_signal(signal.SIGKILL)
                w.proc.wait()
                kills += 1
                disruptions += 1
                plain.append(Plain(b, f"plain-{step}", args.max_in_flight))
                log("kill -9", f"{w.name}; started plain-{step}")
            elif action == "kill-actor":
                victim = d.workers()[0]
                if victim.get("pid"):
                    os.kill(victim["pid"], signal.SIGKILL)
                    kills += 1
                    disruptions += 1
                    log("kill -9", f"{victim['actor']} (pid {victim['pid']})")
            elif action == "restart-broker":
                broker.restart()
                kills += 1
                disruptions += len(plain) + len(d.actors)  # the group may rebalance every member
                log("broker", "killed and restarted (SQLite storage)")
            elif action == "scale":
                target = len(d.actors) + (-1 if scaled_up else 1)
                disruptions += len(plain) + len(d.actors)  # a rebalance revokes partitions in flight
                d.scale(target)
                scaled_up = not scaled_up
                log("scale", f"to {target} Ray workers")
            elif action == "inject":
                prod = Producer({"bootstrap.servers": b})
                frames = hostile_frames(step)
                for key, value, headers in frames:
                    prod.produce(TOPIC, key=key, value=value, headers=headers)
                    injected.append(key)
                prod.flush(30)
                log("inject", f"{len(frames)} hostile frames")
        if producer.wait(timeout=args.minutes * 60 + 600) != 0:
            raise RuntimeError("the producer failed")
        log("stream", "done; reading the topics until every frame is answered")
        # The checker has the last word: the group may still be catching up after the last
        # event, so read again until nothing is missing or 10 minutes pass.
        give_up = time.monotonic() + 600
        while True:
            result = check(b, injected, disruptions, args.max_in_flight, args.rate)
            if result["lost"] == 0 or time.monotonic() > give_up:
                break
            time.sleep(10)  # between two full reads of the topics
        log("checked", f"lost {result['lost']}, duplicates {result['duplicates']} (bound {result['duplicate_bound']})")
    finally:
        stop_sampling.set()
        try:
            d.stop()
        except Exception as e:
            log("stop", f"deployment: {e}")
        for w in plain:
            w.proc.send_signal(signal.SIGTERM)
            w.proc.wait(timeout=60)
        ray.shutdown()
        broker.stop()
    result.update({"minutes": args.minutes, "rate": args.rate, "kills_and_restarts": kills,
                   "worker_disruptions": disruptions,
                   "frames_offered": n, "hostile_injected": len(injected),
                   "events": len(events), "rss_mib_max": max((r["rss_mib"] for r in rss), default=None),
                   "command": " ".join([".venv/bin/python", "-m", "bench.soak", *(argv or sys.argv[1:])])})
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    for name, rows in (("events.csv", events), ("rss.csv", rss)):
        if rows:
            with open(args.out / name, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    plot_rss(args.out, rss, events)
    print(json.dumps({k: v for k, v in result.items() if k != "hostile"}, indent=1))
    ok = result["lost"] == 0 and not result["hostile_without_reason"] and not result["hostile_not_found"]
    return 0 if ok and result["duplicates"] <= result["duplicate_bound"] else 1


def plot_rss(out: Path, rss: list[dict], events: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for name in sorted({r["worker"] for r in rss}):
        pts = [(r["t_s"], r["rss_mib"]) for r in rss if r["worker"] == name]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1, label=name)
    for e in events:
        if e["event"] in ("kill -9", "broker", "scale", "inject"):
            ax.axvline(e["t_s"], color="grey", lw=0.5, ls=":")
    ax.set_xlabel("s since start (dotted: chaos events)")
    ax.set_ylabel("RSS, MiB")
    ax.set_title("Worker memory through the soak")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "rss.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
