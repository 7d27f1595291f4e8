"""Hosts made of Linux namespaces, for the benchmarks and tests that need several machines
(bench/multihost.py, crates/kafray-py/tests/test_multihost.py): each host is a network namespace
(its own address on a private bridge) and a mount namespace with a private /tmp (and HOME under
it), so hosts share nothing through files but the code checkout (and the folders given to keep,
such as a checkout that lies under /tmp). The bridge lives in a namespace of its own, so the
machine's own network is never touched. Needs root."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

SUBNET = "10.251.73"  # addresses exist only inside the namespaces made here


# A fresh tmpfs on /tmp; folders to keep that lie under /tmp (a checkout there) are bound aside
# first (on a tmpfs over /mnt, in this mount namespace only) and bound back after.
PRIVATE_TMP = """set -e
mount -t tmpfs tmpfs /mnt
i=0
for p in "$@"; do case "$p" in /tmp/*) mkdir -p /mnt/$i; mount --bind "$p" /mnt/$i;; esac; i=$((i+1)); done
mount -t tmpfs tmpfs /tmp
i=0
for p in "$@"; do case "$p" in /tmp/*) mkdir -p "$p"; mount --bind /mnt/$i "$p";; esac; i=$((i+1)); done
mkdir -p /tmp/home
echo ready
exec sleep infinity"""


def missing() -> str | None:
    """Why hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns, unshare)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    probe = f"kfr-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class Hosts:
    """`names` hosts, host i at SUBNET.(i+1). Use as a context manager: everything is removed."""

    def __init__(self, names: list[str], keep: list[str] = ()):
        """`keep`: folders every host still sees at their path (the checkout), even under /tmp."""
        self.keep = [str(k) for k in keep]
        self.tag = f"{os.getpid() % 100000}"
        self.switch = f"kfr-sw-{self.tag}"
        self.names = names
        self.ns = {n: f"kfr-{n}-{self.tag}" for n in names}
        self.ip = {n: f"{SUBNET}.{i + 1}" for i, n in enumerate(names)}
        self.holders: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "Hosts":
        try:
            sh("ip", "netns", "add", self.switch)
            sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                ns, port = self.ns[name], f"p{i}-{self.tag}"[:15]
                sh("ip", "netns", "add", ns)
                sh("ip", "link", "add", port, "netns", self.switch, "type", "veth", "peer", "name", "eth0", "netns", ns)
                sh("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
                sh("ip", "-n", ns, "addr", "add", f"{self.ip[name]}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                # One process holds the host's mount namespace (a private /tmp) for its lifetime.
                self.holders[name] = subprocess.Popen(
                    ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "sh", "-c",
                     PRIVATE_TMP, "sh", *self.keep], stdout=subprocess.PIPE, text=True)
                if self.holders[name].stdout.readline().strip() != "ready":
                    raise RuntimeError(f"host {name}: no private /tmp")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def run(self, name: str, args: list[str], **kw) -> subprocess.Popen:
        """Starts `args` on host `name` (its network, its /tmp, HOME=/tmp/home)."""
        env = {**os.environ, "HOME": "/tmp/home", **kw.pop("env", {})}
        # Entering a mount namespace moves to its root: --wd sets the working directory after.
        wd = [f"--wd={kw.pop('cwd')}"] if "cwd" in kw else []
        return subprocess.Popen(["nsenter", "--target", str(self.holders[name].pid), "--mount", "--net", *wd, "--",
                                 *args], env=env, **kw)

    def pids(self, name: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns[name]], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def __exit__(self, *exc) -> None:
        # Every process in the hosts' namespaces (Ray's daemons included), then the namespaces.
        # A second Ctrl-C or SIGTERM must not cut this short and leave hosts behind.
        main = threading.current_thread() is threading.main_thread()  # only it may set handlers
        held = {}
        if main:
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        try:
            deadline = time.monotonic() + 30
            while (alive := [p for n in self.names if n in self.ns for p in self.pids(n)]) and \
                    time.monotonic() < deadline:
                for p in alive:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.2)
            if alive:
                print(f"hosts: processes {alive} survived SIGKILL for 30 s; their namespaces outlive "
                      "the names removed here", flush=True)
            for holder in self.holders.values():
                try:
                    holder.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for ns in [*self.ns.values(), self.switch]:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            for s, handler in held.items():
                # None: a handler set outside Python, which cannot be put back from here.
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)


RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # inside the namespaces only
RAY_NODE = ["--num-cpus", "2", "--memory", str(2 * 2**30), "--object-store-memory", str(256 * 2**20),
            "--disable-usage-stats"]


def start_broker_and_ray(h: Hosts, venv: str, broker_log=subprocess.DEVNULL) -> str:
    """On hosts `broker`, `head` and `node2`: a broker (Tansu, in memory), a Ray head and a second
    Ray node joined to it. Returns the broker's bootstrap address."""
    broker = f"{h.ip['broker']}:9092"
    h.run("broker", ["nisshi", "broker", "--listener-url", f"tcp://{broker}", "--advertised-listener-url",
                     f"tcp://{broker}", "--storage-engine", "memory://tansu/"],
          stdout=subprocess.DEVNULL, stderr=broker_log)
    for host, extra in (("head", ["--head", "--port", "6379", "--include-dashboard=false"]),
                        ("node2", ["--address", f"{h.ip['head']}:6379"])):
        started = h.run(host, [f"{venv}/ray", "start", "--node-ip-address", h.ip[host], *extra, *RAY_NODE],
                        env=RAY_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = started.communicate(timeout=180)[0]
        if started.returncode != 0:
            raise RuntimeError(f"ray start on {host} failed:\n{out[-2000:]}")
    return broker
