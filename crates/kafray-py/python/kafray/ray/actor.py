"""The worker actor: one kafray worker (the Rust engine, GIL released) in a Ray actor.

Only the deployment's controller (:mod:`kafray.ray.controller`) creates and stops these."""
from __future__ import annotations

import os
import time

import ray

import kafray
from kafray import secrets, shipping
from kafray.ray.cluster import READY_TIMEOUT_S, controller_name, error_kind

# By default Ray restarts an actor whose process dies this many times over its life (the
# budget); each restart first waits RESTART_BACKOFF_S[min(restarts, len) - 1] seconds. A worker
# that keeps dying then stays dead, and the controller replaces it with a new actor.
# `--max-restarts -1` lets Ray restart it without end.
MAX_RESTARTS = 5
RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 4.0, 8.0)


def _restarts_so_far() -> int:
    """How often Ray has restarted the current actor (0 on its first start)."""
    ctx = ray.get_runtime_context()
    if not ctx.was_current_actor_reconstructed:
        return 0
    try:
        return max(1, int(ray._private.state.actors(actor_id=ctx.get_actor_id()).get("NumRestarts", 1)))
    except Exception:  # the GCS is busy: count it as a first restart
        return 1


def _model_here(deployment: str, digest: str, entry: str) -> tuple[str, str]:
    """The shipped model's path in this host's cache, fetched from the controller (through Ray's
    object store) the first time a worker on this host needs it; and how: "cache" or "ray"."""
    path = shipping.cached(digest, entry)
    if path is not None:
        return path, "cache"
    controller = ray.get_actor(controller_name(deployment))
    ref, = ray.get(controller.model_ref.remote(digest), timeout=READY_TIMEOUT_S)
    return shipping.store(ray.get(ref, timeout=READY_TIMEOUT_S)), "ray"


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=0)
class KafrayWorkerActor:
    """One kafray worker in a Ray actor. Ray restarts it (re-running __init__) if its process
    dies, up to its restart budget with a growing backoff.

    The worker joins its group as a static member (`group.instance.id` = the actor's name), so a
    restarted actor takes its partitions back without rebalancing the others; a worker the
    controller retires leaves the group, so its partitions move at once."""

    def __init__(self, deployment: str, config: dict, placement: dict, instance_id: str):
        self._spec = {"config": config, **placement}
        self.restarts = _restarts_so_far()
        if self.restarts:
            time.sleep(RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S)) - 1])
        self.worker = None
        self.failure: dict | None = None  # why the worker could not start, for the controller
        self.model_path, self.model_fetched = config.get("model"), None
        try:
            self.worker = self._start_worker(deployment, config, placement, instance_id)
        except Exception as e:  # kept, not raised: Ray would only say that the actor died
            self.failure = {"error": f"{e}", "error_kind": error_kind(e)}

    def _start_worker(self, deployment: str, config: dict, placement: dict, instance_id: str):
        kafka = dict(secrets.kafka_properties(config))
        if placement.get("secrets"):
            # From the controller, not in this actor's arguments (Ray records and shows those).
            controller = ray.get_actor(controller_name(deployment))
            kafka.update(ray.get(controller.kafka_secrets.remote(), timeout=READY_TIMEOUT_S))
        # Its own id last: it wins over the user's settings (refused on the driver anyway).
        kafka["group.instance.id"] = instance_id
        if "metrics_addr" not in config:
            # On the node's address (a Prometheus on another host scrapes it), on a free port:
            # several actors share a node. The controller lists each in its service discovery.
            config = {**config, "metrics_addr": f"{ray.util.get_node_ip_address()}:0"}
        self.model_fetched = None  # "cache" or "ray": how this actor got its shipped model
        if placement.get("model"):
            # The model as shipped, from this host's cache: the driver's path need not exist here.
            path, self.model_fetched = _model_here(deployment, **placement["model"])
            config = {**config, "model": path}
        # Predictions name the actor (or the given prefix and the actor's number).
        worker_id = f"{config['worker_id']}-{instance_id.rsplit('-', 1)[1]}" if config.get("worker_id") else instance_id
        self.model_path = config["model"]
        return kafray.Worker(**{**config, "kafka": kafka, "worker_id": worker_id}).start()

    def spec(self) -> dict:
        """What this actor was made with (its configuration without secrets, model, version)."""
        return self._spec

    def ready(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "worker_id": self.worker and self.worker.worker_id,
                "model_path": self.model_path, "model_fetched": self.model_fetched,
                "version": self._spec.get("version"), **(self.failure or {})}

    def stats(self) -> dict:
        if self.worker is None:
            return {"running": False, "state": "failed", "state_reason": self.failure["error"], **self.failure,
                    "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                    "version": self._spec.get("version")}
        s = self.worker.stats()
        s["restarts"] += self.restarts  # the worker's own restarts, and Ray's of this actor
        s["pid"] = os.getpid()
        s["node_id"] = ray.get_runtime_context().get_node_id()
        s["version"] = self._spec.get("version")
        return s

    def check_health(self) -> dict:
        """The controller's health check: the worker's stats, whose `state` (starting, ready,
        degraded, draining, failed, stopped), `state_reason`, `stalled_partitions` and `error`
        say how it is. An answer that does not come in time counts against it too."""
        return self.stats()

    def stop(self, timeout: float = 60.0) -> dict:
        """Finishes in-flight frames, commits and leaves the group; returns the final stats."""
        return self.worker.stop(timeout) if self.worker is not None else self.stats()
