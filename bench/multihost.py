"""The benchmarks across hosts joined by shaped links: the paper's 1 Gbps network, emulated.

    .venv/bin/python -m bench.multihost                       # 1 Gbps links, about 2 minutes here
    .venv/bin/python -m bench.multihost --link-gbit 0         # the same hosts, links unshaped
    .venv/bin/python -m bench.multihost --link-gbit 0.02 --models mnist   # a link that binds
    .venv/bin/python -m bench.multihost --bench latency       # latency at paced rates instead

Three hosts made of Linux namespaces (bench/hosts.py; needs root): the broker on one, the Ray head
and the sweep's driver on another, a second Ray node on the third, each with its own address and
its own /tmp. With --link-gbit G, every host's link is shaped with `tc` (token bucket, G Gbit/s each
way out of a host), so every frame and every prediction crosses a G Gbit/s link. Then
`python -m bench.sweep --address HEAD --brokers BROKER --systems kafray` (or, with --bench latency,
`python -m bench.latency` with kafray's default batching) runs on the head host, from the
checkout's root. Results go to --out (the benchmark's files, plus hosts.json with the hosts and the
shaping).
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

from bench.hosts import RAY_ENV, Hosts, missing, start_broker_and_ray

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv" / "bin"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--link-gbit", type=float, default=1.0, help="shape each host's link to this (0: no shaping)")
    p.add_argument("--bench", choices=("sweep", "latency"), default="sweep",
                   help="throughput against workers and batch size, or latency at paced rates (2 workers)")
    p.add_argument("--models", default="mnist,mobilenet_v2")
    p.add_argument("--workers", default="1,2", help="the sweep's worker counts")
    p.add_argument("--batches", default="10,40", help="the sweep's batch sizes")
    p.add_argument("--frames", type=int, help="the sweep's frames per cell (default: its own, per model)")
    p.add_argument("--out", type=Path, help="results folder; under /tmp only inside the checkout (each host has "
                   "its own /tmp) (default: bench/results/multihost[-latency]-<G>gbit, or -unshaped)")
    args = p.parse_args()
    link_name = f"{args.link_gbit:g}gbit" if args.link_gbit > 0 else "unshaped"
    prefix = "multihost" if args.bench == "sweep" else "multihost-latency"
    args.out = (args.out or ROOT / "bench" / "results" / f"{prefix}-{link_name}").resolve()
    if args.out.is_relative_to("/tmp") and not args.out.is_relative_to(ROOT.parent):
        p.error(f"--out {args.out}: the benchmark runs on a host with its own /tmp, so its files would be lost; "
                "give a folder outside /tmp or inside the checkout")
    if (why := missing()):
        sys.exit(f"multihost: {why}")
    args.out.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the hosts (namespaces, Ray, the broker) are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with Hosts(["broker", "head", "node2"], keep=[ROOT.parent]) as h:
        shaping, link = None, "links unshaped"
        if args.link_gbit > 0:
            link = f"{args.link_gbit:g} Gbit/s links"
            shaping = f"tc qdisc add dev eth0 root tbf rate {args.link_gbit:g}gbit burst 256kb limit 16mb"
            for name in h.names:
                subprocess.run(["ip", "netns", "exec", h.ns[name], *shaping.split()], check=True)
        try:
            broker = start_broker_and_ray(h, str(VENV))
        except RuntimeError as e:
            sys.exit(str(e))
        cluster = ["--address", f"{h.ip['head']}:6379", "--brokers", broker, "--models", args.models,
                   "--out", str(args.out), "--note", f"3 namespace hosts, {link}"]
        if args.bench == "sweep":
            command = ["bench.sweep", *cluster, "--systems", "kafray", "--workers", args.workers,
                       "--batches", args.batches, *(["--frames", str(args.frames)] if args.frames is not None else [])]
        else:
            command = ["bench.latency", *cluster, "--systems", "kafray"]
        # Run as a module from the checkout's root, where `bench` is found.
        bench = h.run("head", [str(VENV / "python"), "-m", *command], env=RAY_ENV, cwd=str(ROOT))
        code = bench.wait()
        # What crossed each host's shaped link (sent bytes, drops, overlimits).
        qdiscs = {n: subprocess.run(["ip", "netns", "exec", h.ns[n], "tc", "-s", "qdisc", "show", "dev", "eth0"],
                                    capture_output=True, text=True).stdout for n in h.names}
        (args.out / "hosts.json").write_text(json.dumps({"ips": h.ip, "shaping": shaping, "qdiscs": qdiscs,
                                                          "command": " ".join(sys.argv)}, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
