"""Fixtures for the Python tests: a real two-node Ray cluster on this machine, a real broker
(Tansu) and the `kafray` CLI to produce frames and evaluate predictions."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
KAFRAY_BIN = REPO / "target" / "release" / "kafray"
# Two raylets on one machine, each with the resources a small box can give (Ray's defaults
# would claim most of the memory for each node).
NODE = dict(num_cpus=2, memory=2 * 2**30, object_store_memory=256 * 2**20)


def kafray_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    if not KAFRAY_BIN.is_file():
        pytest.fail(f"{KAFRAY_BIN} is missing: run `cargo build --release` (the README's test command does)")
    return subprocess.run([str(KAFRAY_BIN), *args], cwd=REPO, capture_output=True, text=True, **kw)


def produce_mnist(brokers: str, limit: int, rate: int | None = None, partitions: int = 4) -> subprocess.Popen:
    args = [str(KAFRAY_BIN), "produce", "mnist", "--brokers", brokers, "--limit", str(limit),
            "--partitions", str(partitions), "-q"]
    if rate:
        args += ["--rate", str(rate)]
    return subprocess.Popen(args, cwd=REPO)


def produce_photos(brokers: str, limit: int, partitions: int = 4) -> subprocess.Popen:
    """`limit` camera frames (224x224 JPEG) cycling over the shared photos, spread over the partitions."""
    photos = REPO.parent / "shared" / "assets" / "images"
    return subprocess.Popen([str(KAFRAY_BIN), "produce", "camera", str(photos), "--brokers", brokers, "--fps", "10000",
                             "--size", "224", "--limit", str(limit), "--partitions", str(partitions),
                             "--round-robin", "-q"], cwd=REPO)


def wait_for(check, timeout: float, what: str, interval: float = 0.5):
    """Polls `check` until it returns something truthy (returned), or fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def probe(endpoint: str, path: str) -> tuple[int, dict]:
    """GET a worker's probe (/healthz, /readyz) with a real HTTP client: (status, the JSON body)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{endpoint}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def actor_ready(actor) -> dict | None:
    """The actor's ready() answer, or None while it is dead or restarting."""
    import ray

    try:
        return ray.get(actor.ready.remote(), timeout=5)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


def evaluate(brokers: str, expect: int, timeout: int = 180, topic: str = "predictions") -> dict:
    out = kafray_cli("eval", "--brokers", brokers, "--topic", topic, "--expect", str(expect),
                     "--timeout", str(timeout), "--json", timeout=timeout + 60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="session")
def ray_cluster():
    """A head node and a second node, as `ray start --head` plus `ray start --address` would make."""
    import ray
    from ray.cluster_utils import Cluster

    from kafray import ray as kray

    cluster = Cluster(initialize_head=True, head_node_args=dict(NODE, include_dashboard=False))
    cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    kray.connect(cluster.address)
    try:
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def broker():
    import kafray

    b = kafray.EmbeddedBroker("memory")
    try:
        yield b.bootstrap
    finally:
        b.stop()


@pytest.fixture
def deployments():
    """Deployments started by a test; stopped even when it fails, so the next test has the CPUs."""
    started = []
    yield started
    for d in started:
        d.stop()
