"""The benchmarks' shared harness: what bench/sweep.py, latency.py, soak.py and failover.py (and
the tests of crates/kafray-py/tests) share.

- where things are: the checkout (ROOT), the release CLI (CLI), MNIST, the photos of ../shared;
- the machine: `machine()` for run.json, CPU time of processes, threads and the whole machine;
- the cluster: a broker (`start_broker`: the one given, or a local Tansu in memory), Ray
  (`connect_ray`), both for one run (`cluster`), topics (`create_topics`);
- the load: `produce_command` (the `kafray produce` command line) and `evaluate` (`kafray eval`);
- the workers: `Pool`, W Ray actors of one system (kafray's Rust worker, `KafrayWorker`, or the
  Python peer, `peer.PeerWorker`) behind one interface;
- results: `write_csv`, `read_csv`.

Import it as `bench.harness` from the repository root (`python -m bench.<script>`; pytest has the
root on its path through the repository's pytest.ini).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import ray

import kafray

from bench import peer

# Actor code travels by value, so worker processes need neither bench/ on their path nor this
# machine's checkout.
ray.cloudpickle.register_pickle_by_value(peer)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "target/release/kafray"
MNIST = (ROOT / "assets/mnist/t10k-images-idx3-ubyte.gz", ROOT / "assets/mnist/t10k-labels-idx1-ubyte.gz")
PHOTOS = ROOT.parent / "shared/assets/images"
MODEL_TITLES = {"mnist": "MNIST CNN, raw 28x28 digits", "mobilenet_v2": "MobileNetV2, 224x224 JPEG photos",
                "pool_linear": "pool + linear (a cheap stand-in for a GPU model), 224x224 input"}


@ray.remote(max_restarts=0)
class KafrayWorker:
    """kafray's Rust worker (`kafray.Worker`, GIL released) behind the same actor interface as the
    peer's, so both systems are started, measured and stopped the same way."""

    def __init__(self, model_path: str, threads: int = 1, device: str = "cpu"):
        self.model = model_path
        self.threads = threads
        self.device = device
        self.worker = None

    def ready(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def start(self, brokers: str, input_topic: str, output_topic: str, group: str, batch_size: int,
              max_wait_ms: int = 20, max_in_flight: int = 1000, **policy) -> None:
        # `policy`: further worker settings, e.g. latency_target_ms (bench/latency.py).
        self.worker = kafray.Worker(
            brokers=brokers, input_topic=input_topic, output_topic=output_topic, group=group, model=self.model,
            batch_size=batch_size, max_wait_ms=max_wait_ms, max_in_flight=max_in_flight, threads=self.threads,
            device=self.device,
            # No status line and no /metrics endpoint: the peer has neither, and the cells
            # measure the data path.
            status_interval_s=0, metrics_addr="", **policy).start()

    def stats(self) -> dict:
        if self.worker is None:
            return {"pid": os.getpid(), "running": False}
        return {**self.worker.stats(), "pid": os.getpid()}

    def stop(self, timeout: float = 60.0) -> dict:
        s = self.worker.stop(timeout)
        self.worker = None
        return {**s, "pid": os.getpid()}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "os": platform.platform(), "python": platform.python_version(), "kafray": kafray.__version__,
            "ray": ray.__version__, "onnxruntime": _version("onnxruntime"),
            "confluent_kafka": _version("confluent-kafka")}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes, all their threads (local processes only)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


# Thread names group a worker's CPU time: kafray names its two threads; librdkafka names its own
# "rdk:..."; the rest is the actor's Python and Ray threads (and the peer's one thread).
THREAD_CLASSES = (("kafray-worker", "intake"), ("kafray-infer", "infer"), ("rdk:", "librdkafka"))
CPU_CLASSES = tuple(c for _, c in THREAD_CLASSES) + ("other",)


def cpu_by_thread(pids: list[int]) -> dict[str, float]:
    """CPU seconds of these processes' live threads, grouped by THREAD_CLASSES."""
    tick = os.sysconf("SC_CLK_TCK")
    total = dict.fromkeys(CPU_CLASSES, 0.0)
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                name, fields = open(task / "stat").read().split("(", 1)[1].rsplit(")", 1)
            except OSError:
                continue  # the thread ended
            fields = fields.split()
            cls = next((c for prefix, c in THREAD_CLASSES if name.startswith(prefix)), "other")
            total[cls] += (int(fields[11]) + int(fields[12])) / tick
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / tick, sum(fields) / tick


def start_broker(given: str | None):
    """(the local broker to stop later or None, bootstrap servers, a description for run.json):
    the cluster given, or a local Tansu broker in memory."""
    if given:
        return None, given, given
    broker = kafray.EmbeddedBroker("memory")
    return broker, broker.bootstrap, "local Tansu (nisshi), in-memory storage"


def connect_ray(address: str | None, cpus: int) -> bool:
    """Joins the Ray cluster at `address`, or starts one here with `cpus` CPUs. Returns whether
    this run connected (and so disconnects at the end): a caller (a test, a notebook) that is
    connected already keeps its cluster."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 object_store_memory=256 * 2**20)
    return True


@contextlib.contextmanager
def cluster(brokers: str | None, address: str | None, cpus: int):
    """The broker (`start_broker`) and Ray (`connect_ray`) a run measures on, each stopped at the
    end if this run started it. Yields (bootstrap servers, the broker's description for run.json)."""
    broker, bootstrap, described = start_broker(brokers)
    try:
        ours = connect_ray(address, cpus)
        try:
            yield bootstrap, described
        finally:
            if ours:
                ray.shutdown()
    finally:
        if broker is not None:
            broker.stop()


def create_topics(brokers: str, names: list[tuple[str, int]]) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": brokers})
    futures = admin.create_topics([NewTopic(n, p, 1) for n, p in names], request_timeout=30)
    for f in futures.values():
        f.result()


def produce_command(model: str, brokers: str, topic: str, frames: int, photos: Path, size: str = "224") -> list[str]:
    # The load generator skips idempotence: a fresh idempotent producer holds its first frames
    # about a second while it gets a producer id, which would count as every frame's latency.
    # Round-robin: a few photo sources would hash onto a few partitions and leave workers idle.
    # `--repeat frames` always covers `-n frames`, whatever the set holds (the cycle is lazy).
    base = [str(CLI), "produce", "-b", brokers, "-t", topic, "-n", str(frames), "--quiet", "--round-robin",
            "-X", "enable.idempotence=false", "-X", "acks=all"]
    if model == "mnist":
        return base + ["mnist", "--images", str(MNIST[0]), "--labels", str(MNIST[1]), "--repeat", str(frames)]
    # Photos as JPEG frames of `size` (N or WxH), as a camera at that resolution sends them.
    return base + ["images", str(photos), "--size", size, "--repeat", str(frames)]


def evaluate(brokers: str, topic: str, frames: int) -> dict:
    out = subprocess.run([str(CLI), "eval", "-b", brokers, "-t", topic, "-n", str(frames), "--json",
                          "--timeout", "120", "--idle", "3"], capture_output=True, text=True, timeout=180)
    if not out.stdout.strip():
        raise RuntimeError(f"kafray eval failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


class Pool:
    """W actors of one system, reused across batch sizes (the model loads once per actor)."""

    def __init__(self, system: str, workers: int, model: str, threads: int, device: str = "cpu"):
        path = kafray.find_model(model)
        if system == "kafray":
            # On a GPU, the workers share it: Ray gives each a fraction and sets CUDA_VISIBLE_DEVICES.
            gpus = 0 if device == "cpu" else 1.0 / workers
            self.actors = [KafrayWorker.options(num_cpus=1, num_gpus=gpus).remote(path, threads, device)
                           for _ in range(workers)]
        else:
            labels = os.path.join(os.path.dirname(path), "imagenet_classes.txt")
            labels = labels if model != "mnist" and os.path.isfile(labels) else None
            self.actors = [peer.PeerWorker.options(num_cpus=1).remote(path, labels, threads)
                           for _ in range(workers)]
        self.info = ray.get([a.ready.remote() for a in self.actors], timeout=180)
        self.pids = [i["pid"] for i in self.info]
        # CPU time is read from /proc: only for actors on this machine.
        here = ray.util.get_node_ip_address()
        address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        self.local = all(address.get(i["node_id"]) == here for i in self.info)

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.actors], timeout=60)

    def wait_until(self, check, timeout: float, interval: float, what: str) -> None:
        """Polls the actors' stats until `check(stats)` returns (True, _); fails at once on a
        worker's error, or after `timeout` with the progress `check` last described."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            done, progress = check(s)
            if done:
                return
            bad = [x.get("error") for x in s if x.get("error")]
            if bad or time.monotonic() > deadline:
                raise RuntimeError(f"{what}: {progress} ({bad})")
            time.sleep(interval)

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

