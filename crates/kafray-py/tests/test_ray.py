"""kafray workers as Ray actors on a real two-node Ray cluster, against a real broker."""
import os
import signal
import time

import pytest
import ray

from conftest import evaluate, produce_mnist, wait_for
from kafray import ray as kray


def start(deployments, ray_cluster, broker, workers, **config):
    d = kray.Deployment.start(workers, name=f"t{len(deployments)}-{os.getpid()}", address=ray_cluster,
                              brokers=broker, batch_size=20, create_topics=4, **config)
    deployments.append(d)
    return d


def owning(d, n: int) -> bool:
    per = d.workers()
    return len(per) == n and all(w.get("assigned_partitions", 0) > 0 for w in per)


def test_actors_land_on_both_nodes_and_predict_all_10000_digits(ray_cluster, broker, deployments):
    d = start(deployments, ray_cluster, broker, 2)
    placed = ray.get([a.ready.remote() for a in d.actors.values()])
    assert len({p["node_id"] for p in placed}) == 2, f"SPREAD put both actors on one node: {placed}"
    # The stream starts once the group has settled: with no failure and no rebalance inside it,
    # every frame is predicted exactly once.
    wait_for(lambda: owning(d, 2), 60, "both actors to own partitions")
    assert produce_mnist(broker, 10_000).wait(120) == 0

    report = evaluate(broker, 10_000)
    assert report["distinct_frames"] == 10_000 and report["duplicates"] == 0, report
    assert report["accuracy"] >= 0.985, report
    assert len(report["per_worker"]) == 2, report["per_worker"]

    stats = d.stats()
    assert (stats["predicted"], stats["nodes"], stats["running"]) == (10_000, 2, 2), stats
    assert stats["mean_batch"] > 1 and stats["latency_p99_ms"] > 0, stats
    finals = d.stop()
    assert sum(f["predicted"] for f in finals) == 10_000 and all(f["error"] is None for f in finals), finals


def test_sigkilled_actor_is_restarted_and_nothing_is_lost(ray_cluster, broker, deployments):
    producer = produce_mnist(broker, 6000, rate=600)
    d = start(deployments, ray_cluster, broker, 2)
    victim = d.actors[0]
    before = ray.get(victim.ready.remote())
    wait_for(lambda: d.stats()["predicted"] > 600, 60, "the workers to predict 600 frames")
    os.kill(before["pid"], signal.SIGKILL)

    def restarted():
        try:
            return ray.get(victim.ready.remote(), timeout=5)["pid"] != before["pid"]
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    wait_for(restarted, 90, "Ray to restart the killed actor")
    assert producer.wait(60) == 0
    report = evaluate(broker, 6000)
    assert report["distinct_frames"] == 6000, f"frames lost after the kill: {report}"
    assert report["accuracy"] >= 0.98, report
    after = d.stats()
    assert after["running"] == 2 and after["predicted"] > 0, after
    assert after["restarts"] == 1 and not after["failed"], after


def test_a_restarted_actor_takes_its_partitions_back_without_a_rebalance(ray_cluster, broker, deployments):
    """Static membership: the actor comes back under the same group.instance.id within the session
    timeout, so the broker hands it its partitions again and the survivor is never rebalanced."""
    d = start(deployments, ray_cluster, broker, 2)
    wait_for(lambda: owning(d, 2), 60, "both actors to own partitions")
    victim, survivor = d.actors[0], d.actors[1]
    before = ray.get(victim.ready.remote())
    owned = ray.get(survivor.stats.remote())
    os.kill(before["pid"], signal.SIGKILL)

    def back():
        try:
            s = ray.get(victim.stats.remote(), timeout=5)
            return s if s["pid"] != before["pid"] and s["assigned_partitions"] > 0 else None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return None

    again = wait_for(back, 90, "the restarted actor to own partitions again")
    kept = ray.get(survivor.stats.remote())
    assert again["assigned_partitions"] == 4 - owned["assigned_partitions"], (again, kept)
    assert kept["rebalances"] == owned["rebalances"], f"the survivor was rebalanced: {owned} -> {kept}"


def test_scale_up_and_down_while_running(ray_cluster, broker, deployments):
    producer = produce_mnist(broker, 4000, rate=500)
    d = start(deployments, ray_cluster, broker, 1)
    wait_for(lambda: d.stats()["predicted"] > 300, 60, "the first worker's predictions")
    d.scale(3)
    assert len(d.actors) == 3
    wait_for(lambda: owning(d, 3), 60, "the group to rebalance over 3 workers")
    d.scale(1)
    assert len(d.actors) == 1
    assert producer.wait(60) == 0
    report = evaluate(broker, 4000)
    assert report["distinct_frames"] == 4000, report
    assert len(report["per_worker"]) == 3, f"all three workers predicted something: {report['per_worker']}"


def test_asking_for_more_cpus_than_the_cluster_has_fails_at_once(ray_cluster, broker, deployments):
    began = time.monotonic()
    with pytest.raises(kray.ClusterTooSmall, match=r"12 CPU.*free"):
        start(deployments, ray_cluster, broker, 6, num_cpus=2)
    assert time.monotonic() - began < 10
    assert not [n for n in ray.util.list_named_actors() if "-worker-" in n]


def test_a_worker_that_cannot_start_fails_the_deployment_and_leaves_nothing(ray_cluster, broker, deployments,
                                                                            tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(ray.exceptions.RayError, match="bad.onnx"):
        start(deployments, ray_cluster, broker, 2, model=str(bad))
    assert not [n for n in ray.util.list_named_actors() if "-worker-" in n]


def test_an_actor_that_keeps_dying_stays_dead_and_says_why(ray_cluster, broker, deployments):
    """The restart budget: with max_restarts=1, a second death is final, and stats() names it
    instead of Ray restarting the actor forever."""
    d = start(deployments, ray_cluster, broker, 1, max_restarts=1)
    actor = d.actors[0]
    first = ray.get(actor.ready.remote())
    os.kill(first["pid"], signal.SIGKILL)

    def restarted():
        try:
            return ray.get(actor.ready.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return None

    second = wait_for(lambda: (r := restarted()) and r["pid"] != first["pid"] and r, 90, "the one restart")
    os.kill(second["pid"], signal.SIGKILL)
    stats = wait_for(lambda: (s := d.stats())["failed"] and s, 60, "the deployment to report the dead actor")
    (name, cause), = stats["failed"].items()
    assert name.endswith("-worker-000") and "died" in cause.lower(), stats["failed"]
    assert stats["running"] == 0, stats
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.ready.remote(), timeout=30)
