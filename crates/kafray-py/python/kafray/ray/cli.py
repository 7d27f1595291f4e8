"""`kafray-ray` (or `python -m kafray.ray`): kafray on a Ray cluster from the command line.

    kafray-ray up --workers 4 --brokers kafka:9092 --name cams --detach
    kafray-ray stats --name cams
    kafray-ray scale --name cams 8
    kafray-ray update --name cams --model models/mnist_v2.onnx   # rolling, never without a worker
    kafray-ray up --autoscale 1:8 --lag-threshold 5000 --name cams --detach
    kafray-ray scale --name cams --autoscale 2:8 --lag-threshold 5000   # new bounds while autoscaling
    kafray-ray down --name cams
    kafray-ray batch --files 1000 --per-file 10

Every command that changes the deployment sets its controller's target and waits until the
controller has reconciled the workers to it. Exit codes: 0 done, 1 the workers failed, 2 a bad
setting (a flag, the configuration, a cluster too small).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import ray

import kafray
from kafray.autoscale import DOWNSCALE_DELAY_S, UPSCALE_DELAY_S, LagAutoscaler, parse_bounds
from kafray.ray.actor import MAX_RESTARTS
from kafray.ray.cluster import ClusterTooSmall, DeploymentFailed
from kafray.ray.handle import Deployment

# Where a deployment's default differs from a plain worker's.
_RAY_DEFAULTS = {
    "group": "--name",
    "model": "mnist; read here and shipped to the nodes through Ray",
    "threads": "--num-cpus",
    "decode_threads": "--num-cpus with --num-gpus, else 1",
    "device": "cuda with --num-gpus (the GPU Ray gives the actor), else cpu",
    "worker_id": "the actor's name",
    "metrics_addr": "the node's address, a free port, listed in the deployment's Prometheus targets file",
}
# What a flag does differently on Ray.
_RAY_NOTES = {
    "kafka": "repeatable; a ${env:NAME} value is resolved on the worker's node",
    "worker_id": "on Ray, a prefix: each worker adds its number",
    "kafka_config": "read here; its secrets reach the workers through the controller, never in an actor's arguments",
}


def _worker_help(field: str) -> str:
    """A worker flag's help: the field's own (WorkerConfig's doc comment), with the default a
    deployment gives it."""
    doc = kafray.WORKER_CONFIG_DOCS[field]
    parts = [doc["summary"]]
    if field in _RAY_NOTES:
        parts.append(f"({_RAY_NOTES[field]})")
    if field not in ("kafka", "insecure_skip_tls_verify"):
        parts.append(f"[default: {_RAY_DEFAULTS.get(field, doc['default'])}]")
    return " ".join(parts).replace("%", "%%")


def _add_worker_flags(up: argparse.ArgumentParser) -> None:
    """One flag per field of the worker's configuration (`kafray.WORKER_CONFIG_FIELDS`), each
    with that field as its `dest` and its help from the field's doc comment
    (`kafray.WORKER_CONFIG_DOCS`); a test checks that none is missing. Unset flags are left to
    the worker's own layers (its KAFRAY_<FIELD> variables, then the defaults)."""
    w = up.add_argument_group("worker settings (as `kafray worker`)")
    w.add_argument("--brokers", "-b", default=os.environ.get("KAFRAY_BROKERS"), help=_worker_help("brokers"))
    w.add_argument("--input-topic", "--input", "-i", dest="input_topic", help=_worker_help("input_topic"))
    w.add_argument("--output-topic", "--output", "-o", dest="output_topic", help=_worker_help("output_topic"))
    w.add_argument("--dead-letter-topic", dest="dead_letter_topic", help=_worker_help("dead_letter_topic"))
    w.add_argument("--group", "-g", help=_worker_help("group"))
    w.add_argument("--model", "-m", default="mnist", help=_worker_help("model"))
    w.add_argument("--batch-size", dest="batch_size", type=int, help=_worker_help("batch_size"))
    w.add_argument("--max-wait-ms", dest="max_wait_ms", type=int, help=_worker_help("max_wait_ms"))
    w.add_argument("--latency-target-ms", dest="latency_target_ms", type=int, help=_worker_help("latency_target_ms"))
    w.add_argument("--threads", type=int, help=_worker_help("threads"))
    w.add_argument("--decode-threads", dest="decode_threads", type=int, help=_worker_help("decode_threads"))
    w.add_argument("--device", help=_worker_help("device"))
    w.add_argument("--top-k", dest="top_k", type=int, help=_worker_help("top_k"))
    w.add_argument("--max-in-flight", dest="max_in_flight", type=int, help=_worker_help("max_in_flight"))
    w.add_argument("--stall-after-s", dest="stall_after_s", type=int, metavar="S", help=_worker_help("stall_after_s"))
    w.add_argument("--status-interval", dest="status_interval_s", type=int, help=_worker_help("status_interval_s"))
    w.add_argument("--worker-id", dest="worker_id", help=_worker_help("worker_id"))
    w.add_argument("--metrics-addr", dest="metrics_addr", metavar="ADDR", help=_worker_help("metrics_addr"))
    w.add_argument("--create-topics", dest="create_topics", type=int, metavar="P", help=_worker_help("create_topics"))
    w.add_argument("-X", dest="kafka", action="append", metavar="KEY=VALUE", help=_worker_help("kafka"))
    w.add_argument("--kafka-config", dest="kafka_config", metavar="FILE", default=os.environ.get("KAFRAY_KAFKA_CONFIG"),
                   help=_worker_help("kafka_config"))
    w.add_argument("--insecure-skip-tls-verify", dest="insecure_skip_tls_verify", action="store_true", default=None,
                   help=_worker_help("insecure_skip_tls_verify"))


def _worker_config(args) -> dict:
    config = {f: getattr(args, f) for f in kafray.WORKER_CONFIG_FIELDS if getattr(args, f, None) is not None}
    config["group"] = args.group or args.name
    if args.kafka:
        config["kafka"] = dict(kv.split("=", 1) for kv in args.kafka)
    return config


def _autoscale(args, p: argparse.ArgumentParser) -> dict | None:
    """The --autoscale flags as LagAutoscaler's arguments (None without --autoscale)."""
    if args.autoscale is None:
        if args.lag_threshold is not None or args.max_lag_seconds is not None:
            p.error("--lag-threshold and --max-lag-seconds need --autoscale MIN:MAX")
        return None
    try:
        low, high = parse_bounds(args.autoscale)
        settings = dict(min_workers=low, max_workers=high, lag_threshold=args.lag_threshold,
                        max_lag_seconds=args.max_lag_seconds, upscale_delay_s=args.upscale_delay_s,
                        downscale_delay_s=args.downscale_delay_s)
        LagAutoscaler(**settings)
    except ValueError as e:
        p.error(str(e))
    if args.cmd == "up" and args.workers is not None and not low <= args.workers <= high:
        p.error(f"--workers {args.workers} is outside --autoscale {args.autoscale}")
    return settings


def _add_autoscale_flags(cmd: argparse.ArgumentParser) -> None:
    a = cmd.add_argument_group("autoscaling (KEDA's Kafka rule, Ray Serve's delays)")
    a.add_argument("--autoscale", metavar="MIN:MAX",
                   help="size the deployment to its lag, between MIN and MAX workers (never above the partitions)")
    a.add_argument("--lag-threshold", type=int, metavar="FRAMES",
                   help="one worker per FRAMES of total lag: desired = ceil(lag / FRAMES)")
    a.add_argument("--max-lag-seconds", type=float, metavar="S",
                   help="time-lag objective: lag / the rate the workers sustain stays under S seconds")
    a.add_argument("--upscale-delay-s", type=float, default=UPSCALE_DELAY_S,
                   help=f"scale up once asked for this long (default {UPSCALE_DELAY_S:g}, as Ray Serve)")
    a.add_argument("--downscale-delay-s", type=float, default=DOWNSCALE_DELAY_S,
                   help=f"scale down once asked for this long (default {DOWNSCALE_DELAY_S:g}, as Ray Serve)")


def _print_stats(s: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(s), flush=True)
        return
    rate = "-" if s["rate"] is None else f"{s['rate']:.0f}"
    print(f"workers {s['running']}/{s['workers']} on {s['nodes']} node(s) | predicted {s['predicted']} | "
          f"{rate} frames/s | mean batch {s['mean_batch']:.1f} (limits {s['batch_limits']}) | lag {s['lag']} | "
          f"p50 {s['latency_p50_ms']:.0f} ms p99 {s['latency_p99_ms']} ms | restarts {s['restarts']}", flush=True)
    last = (s.get("controller") or {}).get("last") or {}
    if "action" in last:
        print(f"  autoscale: {last['workers']} -> desired {last['desired']} ({last['action']}): {last['reason']}",
              flush=True)
    for w in s["per_worker"]:
        if w.get("error"):
            print(f"  {w['actor']}: {w['error']}", flush=True)
    status = s.get("controller") or {}
    if status.get("replaced"):
        last = status["replacements"][-1]
        print(f"  replaced {status['replaced']} worker(s); last: {last['actor']} ({last['reason']}): {last['detail']}",
              flush=True)
    if status.get("status") == "failed" and status.get("error"):
        print(f"  failed: {status['error'].get('actor', '')}: {status['error']['error']}", flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kafray-ray", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default="auto",
                        help="Ray cluster address (default: the cluster `ray start` made on this machine)")
    common.add_argument("--name", default="kafray", help="deployment name (actor names; default consumer group)")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", parents=[common],
                        help="start N workers as Ray actors; print stats until Ctrl-C (or --detach)")
    up.add_argument("--workers", "-n", type=int, help="workers to start with (2; with --autoscale: MIN)")
    up.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per worker (Ray resource)")
    up.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per worker (Ray resource)")
    up.add_argument("--max-restarts", type=int, default=MAX_RESTARTS,
                    help=f"restarts of a worker whose process dies, with backoff (default {MAX_RESTARTS}; -1: no end)")
    _add_worker_flags(up)
    _add_autoscale_flags(up)
    up.add_argument("--detach", action="store_true", help="start and return; the actors outlive this command")
    up.add_argument("--interval", type=float, default=5.0, help="seconds between stats lines")
    up.add_argument("--duration", type=float, help="stop after this many seconds")
    up.add_argument("--json", action="store_true", help="print stats as JSON lines")

    st = sub.add_parser("stats", parents=[common], help="stats of a detached deployment")
    st.add_argument("--json", action="store_true")
    sc = sub.add_parser("scale", parents=[common],
                        help="grow or shrink a detached deployment, or change its autoscaling bounds")
    sc.add_argument("workers", type=int, nargs="?",
                    help="workers to run (refused while autoscaling: the autoscaler would undo it)")
    sc.add_argument("--no-autoscale", action="store_true", help="turn autoscaling off (give WORKERS too)")
    _add_autoscale_flags(sc)
    sub.add_parser("down", parents=[common], help="stop a detached deployment gracefully")
    ud = sub.add_parser("update", parents=[common],
                        help="rolling update: replace the workers one by one with workers running --model")
    ud.add_argument("--model", "-m", required=True, help="the new model (path or name)")

    bt = sub.add_parser("batch", parents=[common], help="the paper's batch study on Ray: classify MNIST shards, one task per file")
    bt.add_argument("--files", type=int, default=1000)
    bt.add_argument("--per-file", type=int, default=10, help="digits per shard file")
    bt.add_argument("--nodes", type=int, help="use the first N nodes (default: all)")
    bt.add_argument("--out", default="bench/results/batch")
    bt.add_argument("--model", default="mnist")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        if args.cmd == "up":
            for kv in args.kafka or []:
                if "=" not in kv:
                    p.error(f"-X {kv!r}: expected KEY=VALUE, e.g. -X fetch.wait.max.ms=50")
            autoscale = _autoscale(args, p)
            workers = args.workers if args.workers is not None else (autoscale or {}).get("min_workers", 2)
            d = Deployment.start(workers, name=args.name, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                                 address=args.address, detached=args.detach, max_restarts=args.max_restarts,
                                 autoscale=autoscale, **_worker_config(args))
            print(f"kafray-ray: {workers} worker(s) up as {args.name!r} "
                  f"(group {d.config['group']!r}, model {d.config['model']})"
                  + (f", autoscaling {args.autoscale}" if autoscale else ""), flush=True)
            if args.detach:
                return 0
            stopping = []
            signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
            began = time.monotonic()
            try:
                while not stopping and (args.duration is None or time.monotonic() - began < args.duration):
                    time.sleep(min(args.interval, max(0.1, (args.duration or 1e9) - (time.monotonic() - began))))
                    _print_stats(d.stats(), args.json)
            except KeyboardInterrupt:
                pass
            finals = d.stop()
            print(f"kafray-ray: stopped; predicted {sum(f.get('predicted', 0) for f in finals)} in total", flush=True)
        elif args.cmd == "stats":
            d = Deployment.attach(args.name, args.address)
            d.stats()
            time.sleep(1.0)
            _print_stats(d.stats(), args.json)
        elif args.cmd == "scale":
            autoscale = _autoscale(args, p)
            if args.workers is None and autoscale is None:
                p.error("give WORKERS (kafray-ray scale 4) or new bounds (kafray-ray scale --autoscale 2:8 "
                        "--lag-threshold 5000)")
            if autoscale is not None and (args.workers is not None or args.no_autoscale):
                p.error("give either WORKERS (a fixed size) or --autoscale MIN:MAX (bounds), not both")
            if args.no_autoscale and args.workers is None:
                p.error("--no-autoscale needs WORKERS: the size to hold once the autoscaler is off")
            d = Deployment.attach(args.name, args.address)
            done = d.scale(args.workers, autoscale=autoscale, autoscale_off=args.no_autoscale)
            print(f"kafray-ray: {args.name!r} now has {done['replicas']} worker(s)"
                  + (f", autoscaling {args.autoscale}" if autoscale else ""))
        elif args.cmd == "down":
            finals = Deployment.attach(args.name, args.address).stop()
            print(f"kafray-ray: {args.name!r} stopped ({len(finals)} worker(s))")
        elif args.cmd == "update":
            done = Deployment.attach(args.name, args.address).update(model=args.model)
            print(f"kafray-ray: {args.name!r} now runs {done['model']} "
                  f"(version {done['version']}; {done['workers']} worker(s), replaced one by one)")
        elif args.cmd == "batch":
            from kafray import study
            return study.main(["--engines", "ray", "--files", str(args.files), "--per-file", str(args.per_file),
                               "--out", args.out, "--model", args.model, "--address", args.address]
                              + (["--nodes", str(args.nodes)] if args.nodes else []))
    except (ValueError, ClusterTooSmall) as e:
        print(f"kafray-ray: error: {e}", file=sys.stderr)
        return 2
    except (DeploymentFailed, ray.exceptions.RayError, TimeoutError) as e:
        print(f"kafray-ray: error: {e}", file=sys.stderr)
        return 1
    except ConnectionError as e:
        print(f"kafray-ray: error: {e}: is the cluster up (`ray start --head` on this machine) and --address "
              f"right?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
