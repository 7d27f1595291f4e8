"""kafray on a Ray cluster: workers as Ray actors, and the paper's batch study on Ray.

Library::

    from kafray.ray import Deployment
    d = Deployment.start(workers=4, brokers="kafka:9092", model="mnist", batch_size=20)
    d.stats(); d.scale(8); d.stop()

CLI (``kafray-ray`` or ``python -m kafray.ray``)::

    kafray-ray up --workers 4 --brokers kafka:9092 --name cams --detach
    kafray-ray stats --name cams
    kafray-ray scale --name cams 8
    kafray-ray update --name cams --model models/mnist_v2.onnx   # rolling, never without a worker
    kafray-ray up --autoscale 1:8 --lag-threshold 5000 --name cams --detach
    kafray-ray down --name cams
    kafray-ray batch --files 1000 --per-file 10

Each actor runs a :class:`kafray.Worker` (Rust, GIL released) in one consumer group, so Kafka
spreads the partitions over the actors and rebalances when actors come and go. Actors are
restarted by Ray when their process dies, up to a budget (``--max-restarts``) with backoff; each
actor is a static group member, so a restarted one takes its partitions back without a rebalance.
Offsets are committed only after results are acknowledged, so a crash re-delivers what was in
flight and loses nothing.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import kafray
from kafray import _native, batch, secrets, shipping
from kafray.autoscale import DOWNSCALE_DELAY_S, UPSCALE_DELAY_S, LagAutoscaler, parse_bounds
from kafray.files import write_file_atomically

NAMESPACE = "kafray"
# An actor that cannot be placed waits forever in Ray; we wait this long, then say why.
READY_TIMEOUT_S = 120.0
# How often the controller reads the workers' stats (lag, rate) and refreshes service discovery.
CONTROL_INTERVAL_S = 2.0
# The controller's record of its turns (stats and decisions) keeps the last day at that interval.
HISTORY_TURNS = 43_200


class ClusterTooSmall(RuntimeError):
    """The cluster lacks the resources asked for (Ray would wait for them without a word)."""


# By default Ray restarts an actor whose process dies this many times over its life (the
# budget); each restart first waits RESTART_BACKOFF_S[min(restarts, len) - 1] seconds. A worker
# that keeps dying (a crash on start, a node that keeps failing) then stays dead, and its cause
# shows in `stats()` and the CLI, rather than looping. `--max-restarts -1` restores the loop.
MAX_RESTARTS = 5
RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 4.0, 8.0)


def _restarts_so_far() -> int:
    """How often Ray has restarted the current actor (0 on its first start)."""
    ctx = ray.get_runtime_context()
    if not ctx.was_current_actor_reconstructed:
        return 0
    try:
        from ray.util.state import get_actor

        state = get_actor(ctx.get_actor_id())
        return max(1, int(getattr(state, "num_restarts", 1) or 1))
    except Exception:  # the state API is best effort: count it as a first restart
        return 1


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=0)
class KafrayWorkerActor:
    """One kafray worker in a Ray actor. Ray restarts it (re-running __init__) if its process
    dies, up to MAX_RESTARTS times with a growing backoff.

    The worker joins its group as a static member (`group.instance.id` = the actor's name), so a
    restarted actor takes its partitions back without rebalancing the others."""

    def __init__(self, config: dict, placement: dict, instance_id: str):
        self._spec = {"config": config, **placement}
        self.restarts = _restarts_so_far()
        if self.restarts:
            time.sleep(RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S)) - 1])
        deployment = instance_id.rsplit("-worker-", 1)[0]
        kafka = dict(secrets.kafka_properties(config))
        if placement.get("secrets"):
            # From the controller, not in this actor's arguments (Ray records and shows those).
            controller = ray.get_actor(f"{deployment}-controller")
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
        self.worker = kafray.Worker(**{**config, "kafka": kafka, "worker_id": worker_id}).start()

    def spec(self) -> dict:
        """What this deployment's actors are made of, so `scale` can add more of the same."""
        return self._spec

    def ready(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "worker_id": self.worker.worker_id,
                "model_path": self.model_path, "model_fetched": self.model_fetched}

    def stats(self) -> dict:
        s = self.worker.stats()
        s["restarts"] += self.restarts  # the worker's own restarts, and Ray's of this actor
        s["pid"] = os.getpid()
        s["node_id"] = ray.get_runtime_context().get_node_id()
        return s

    def stop(self, timeout: float = 60.0) -> dict:
        return self.worker.stop(timeout)


def _model_here(deployment: str, digest: str, entry: str) -> tuple[str, str]:
    """The shipped model's path in this host's cache, fetched from the controller (through Ray's
    object store) the first time a worker on this host needs it; and how: "cache" or "ray"."""
    path = shipping.cached(digest, entry)
    if path is not None:
        return path, "cache"
    controller = ray.get_actor(f"{deployment}-controller")
    ref, = ray.get(controller.model_ref.remote(digest), timeout=READY_TIMEOUT_S)
    return shipping.store(ray.get(ref, timeout=READY_TIMEOUT_S)), "ray"


def check_kafka_for_ray(config: dict) -> None:
    """Each actor joins its group as a static member under its own `group.instance.id` (its
    name): one id given to all would have them fence one another out of the group."""
    kafka = dict(config.get("kafka") or {})  # a dict, or (key, value) pairs as the worker takes
    if "group.instance.id" in kafka:
        raise ValueError(f"-X group.instance.id={kafka['group.instance.id']}: on Ray each worker is a static "
                         f"member under its own id (the actor's name); remove it")


def _death_cause(e: Exception) -> str:
    """The first lines of why an actor call failed: Ray's death cause names the actor's error."""
    text = f"{type(e).__name__}: {e}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:3])[:500]


def connect(address: str | None = "auto") -> None:
    """Joins the Ray cluster at `address` ("auto": the one `ray start` made on this machine)."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")


def cluster_nodes() -> list[dict]:
    """Alive nodes with CPUs, in a stable order (head first, then by id)."""
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    return sorted(nodes, key=lambda n: ("node:__internal_head__" not in n["Resources"], n["NodeID"]))


def check_resources(count: int, num_cpus: float, num_gpus: float) -> None:
    """Fails clearly where Ray would leave actors pending forever."""
    free = ray.available_resources()
    total = ray.cluster_resources()
    for name, each in (("CPU", num_cpus), ("GPU", num_gpus)):
        need = count * each
        if need > free.get(name, 0) + 1e-9:
            raise ClusterTooSmall(
                f"{count} worker(s) x {each:g} {name} = {need:g} {name}, but the cluster has "
                f"{free.get(name, 0):g} of {total.get(name, 0):g} {name} free: lower --workers or "
                f"--num-{name.lower()}s (fractions such as 0.5 are allowed), stop other work, or add nodes"
            )


def merged_quantiles(counts: list[list[tuple[int, int]]], quantiles: tuple[float, ...]) -> list[int]:
    """Quantiles of several workers' latency histograms ((ms, count) per bucket) added together,
    as one histogram of every prediction would give them (0 where there is none)."""
    merged: dict[int, int] = {}
    for worker in counts:
        for value, count in worker:
            merged[value] = merged.get(value, 0) + count
    total = sum(merged.values())
    out = []
    for q in quantiles:
        rank, seen, found = max(1, math.ceil(q * total)), 0, 0
        for value in sorted(merged):
            seen += merged[value]
            if seen >= rank:
                found = value
                break
        out.append(found if total else 0)
    return out


def _actor_name(deployment: str, index: int) -> str:
    return f"{deployment}-worker-{index:03d}"


class Deployment:
    """N kafray workers as Ray actors, spread over the cluster's nodes, sharing one consumer group."""

    def __init__(self, name: str, config: dict, num_cpus: float, num_gpus: float, detached: bool,
                 max_restarts: int = MAX_RESTARTS, model: dict | None = None, with_secrets: bool = False):
        self.name = name
        # The workers fetch the Kafka secrets from the controller (see kafray.secrets).
        self.with_secrets = with_secrets
        # The shipped model ({"digest", "entry"}): workers load it from their host's cache.
        self.model = model
        self.max_restarts = max_restarts
        self.config = config
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.detached = detached
        self.actors: dict[int, Any] = {}
        self._last: tuple[float, int] | None = None
        self._controller = None

    @classmethod
    def start(
        cls,
        workers: int = 2,
        *,
        name: str = "kafray",
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        address: str | None = "auto",
        detached: bool = False,
        max_restarts: int = MAX_RESTARTS,
        autoscale: dict | None = None,
        **config,
    ) -> "Deployment":
        """Starts `workers` actors and the deployment's controller; `config` is
        :class:`kafray.Worker`'s (brokers, model, ...). Ray restarts an actor whose process dies up
        to `max_restarts` times (-1: without end). `autoscale`: the arguments of
        :class:`kafray.autoscale.LagAutoscaler` (min_workers, max_workers, lag_threshold, ...), to
        size the deployment to its lag from then on.

        The model (with its TOML and labels) is read here and shipped: the controller puts it in
        Ray's object store once, and each host keeps it in a cache named by its content, so no
        host needs a copy of its own. Kafka secrets (a password in `kafka` or in the
        `kafka_config` file, read here) reach the workers through the controller, never in an
        actor's arguments (see :mod:`kafray.secrets`)."""
        config, kafka_secrets = secrets.split(config)
        check_kafka_for_ray(config)  # before anything starts
        connect(address)
        config.setdefault("group", name)
        config.setdefault("threads", max(1, int(num_cpus)))
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it gives the actor: "cuda" is GPU 0 of those.
        config.setdefault("device", "cuda" if num_gpus > 0 else "cpu")
        config["model"] = kafray.find_model(config.get("model", "mnist"))
        shipped = shipping.bundle(config["model"])
        config.setdefault("status_interval_s", 5)
        d = cls(name, config, num_cpus, num_gpus, detached, max_restarts, shipped.key, bool(kafka_secrets))
        existing = [n for n in ray.util.list_named_actors() if n.startswith(f"{name}-worker-")]
        if existing:
            raise ValueError(f"a deployment named {name!r} is running ({len(existing)} actors): "
                             f"use `kafray-ray down --name {name}` or another --name")
        if autoscale is not None:
            LagAutoscaler(**autoscale)  # a bad setting fails before any actor starts
        try:
            # First: the workers fetch the model from it. Held: Ray ends a non-detached actor
            # once no handle to it is left.
            d._controller = d.start_controller(autoscale, shipped, kafka_secrets)
            d.scale(workers)
        except BaseException:
            d.stop()
            raise
        return d

    @classmethod
    def attach(cls, name: str = "kafray", address: str | None = "auto") -> "Deployment":
        """Finds a running (detached) deployment by name."""
        connect(address)
        d = cls(name, {}, 0, 0, True)
        for actor_name in ray.util.list_named_actors():
            if actor_name.startswith(f"{name}-worker-"):
                d.actors[int(actor_name.rsplit("-", 1)[1])] = ray.get_actor(actor_name)
        if not d.actors:
            raise ValueError(f"no deployment named {name!r} in namespace {NAMESPACE!r}")
        spec = ray.get(d.actors[max(d.actors)].spec.remote(), timeout=30)  # the newest: after an update
        d.config, d.num_cpus, d.num_gpus = spec["config"], spec["num_cpus"], spec["num_gpus"]
        d.max_restarts = spec.get("max_restarts", MAX_RESTARTS)
        d.model = spec.get("model")
        d.with_secrets = spec.get("secrets", False)
        return d

    def _refresh(self) -> None:
        """The actors as Ray knows them by name: the controller may have scaled or updated."""
        found = {int(n.rsplit("-", 1)[1]): n for n in ray.util.list_named_actors()
                 if n.startswith(f"{self.name}-worker-")}
        for i in set(self.actors) - set(found):
            self.actors.pop(i)
        for i, actor_name in found.items():
            if i not in self.actors:
                self.actors[i] = ray.get_actor(actor_name)

    def controller(self):
        """The deployment's controller actor (autoscaler, rolling updates, service discovery), or None."""
        try:
            return ray.get_actor(f"{self.name}-controller")
        except ValueError:
            return None

    def _spawn(self, index: int, config: dict | None = None, model: dict | None = None):
        options = dict(
            name=_actor_name(self.name, index),
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            scheduling_strategy="SPREAD",
            max_restarts=self.max_restarts,
        )
        if self.detached:
            options["lifetime"] = "detached"
        placement = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_restarts": self.max_restarts,
                     "model": model or self.model, "secrets": self.with_secrets}
        return KafrayWorkerActor.options(**options).remote(config or self.config, placement, options["name"])

    def scale(self, workers: int, timeout: float = READY_TIMEOUT_S) -> None:
        """Grows or shrinks to `workers` actors. New actors join the group, leaving ones finish
        their in-flight frames and commit first; Kafka rebalances the partitions either way."""
        if workers < 0:
            raise ValueError("workers must be >= 0")
        grow = workers - len(self.actors)
        if grow > 0:
            check_resources(grow, self.num_cpus, self.num_gpus)
            start = max(self.actors, default=-1) + 1
            new = {i: self._spawn(i) for i in range(start, start + grow)}
            self.actors.update(new)
            refs = [a.ready.remote() for a in new.values()]
            try:
                ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
                ray.get(ready)  # raises the first actor's error (bad model, bad config) as is
                if pending:
                    raise ClusterTooSmall(f"{len(pending)} of {grow} new worker(s) not placed within {timeout:.0f} s;"
                                          f" the cluster has {ray.available_resources()} free")
            except BaseException:
                for i, actor in new.items():  # no half-started deployment left behind
                    ray.kill(actor, no_restart=True)
                    self.actors.pop(i, None)
                raise
        elif grow < 0:
            leaving = sorted(self.actors)[workers:]
            self._stop_actors([self.actors.pop(i) for i in leaving])

    def update(self, timeout: float = READY_TIMEOUT_S, **changes) -> dict:
        """Replaces the workers one by one with workers whose configuration has `changes` (a new
        `model`, say). Each new worker joins the group before an old one leaves, so the group is
        never empty; each old one finishes its in-flight frames and commits before it goes.
        Predictions name the model that made them. Stops at the first new worker that fails to
        start (that one is removed; the workers replaced before it keep the new configuration).
        A new model is read here and shipped like the first. The controller runs the update,
        between its autoscaling turns."""
        shipped = None
        if "model" in changes:
            changes["model"] = kafray.find_model(changes["model"])
            shipped = shipping.bundle(changes["model"])
        kafka_secrets = None
        if "kafka" in changes or "kafka_config" in changes:
            changes, kafka_secrets = secrets.split(changes)
            changes.setdefault("kafka", [])
            kafka_secrets = kafka_secrets or None  # new credentials replace the old; none keeps them
        # A bad field fails here, before any worker is touched. References (${env:NAME}) are left
        # out: they are resolved on the workers' nodes, not here.
        checked = {**self.config, **changes}
        checked["kafka"] = [[k, v] for k, v in secrets.kafka_properties(checked)
                            if not _native.is_secret_reference(v)]
        kafray.Worker(**checked)
        check_kafka_for_ray({**self.config, **changes})
        controller = self.controller()
        if controller is None:
            raise ValueError(f"deployment {self.name!r} has no controller: stop it and start it again")
        return ray.get(controller.update.remote(changes, shipped, kafka_secrets))

    def _roll(self, changes: dict, model: dict | None, timeout: float = READY_TIMEOUT_S) -> dict:
        """The rolling replacement itself (in the controller)."""
        config = {**self.config, **changes}
        model = model or self.model
        self._refresh()
        replaced = []
        for old in sorted(self.actors):
            check_resources(1, self.num_cpus, self.num_gpus)
            index = max(self.actors) + 1
            actor = self._spawn(index, config, model)
            try:
                ray.get(actor.ready.remote(), timeout=timeout)
                deadline = time.monotonic() + timeout
                while not (s := ray.get(actor.stats.remote(), timeout=30))["joined"]:
                    if s.get("error") or time.monotonic() > deadline:
                        raise RuntimeError(f"the new worker did not join the group: {s.get('error') or 'timed out'}")
                    time.sleep(0.2)
            except BaseException:
                ray.kill(actor, no_restart=True)
                raise
            self.actors[index] = actor
            self._stop_actors([self.actors.pop(old)])
            replaced.append({"old": _actor_name(self.name, old), "new": _actor_name(self.name, index)})
        self.config, self.model = config, model
        return {"model": config.get("model"), "replaced": replaced}

    def _stop_actors(self, actors: list, timeout: float = 60.0) -> list[dict]:
        refs = [a.stop.remote(timeout) for a in actors]
        finals = []
        for ref in refs:
            try:
                finals.append(ray.get(ref, timeout=timeout + 10))
            except Exception as e:  # a dead or stuck actor: killing it still commits nothing new
                finals.append({"error": str(e)})
        for a in actors:
            ray.kill(a, no_restart=True)
        return finals

    def workers(self) -> list[dict]:
        """Each actor's stats, or {"error": ...} while it is down or restarting."""
        self._refresh()
        refs = {i: a.stats.remote() for i, a in sorted(self.actors.items())}
        out = []
        for i, ref in refs.items():
            try:
                s = ray.get(ref, timeout=10)
            except Exception as e:  # restarting, or dead for good: say why
                s = {"error": _death_cause(e), "running": False}
            s["actor"] = _actor_name(self.name, i)
            out.append(s)
        return out

    def stats(self, with_controller: bool = True) -> dict:
        """Totals over the actors, and `failed`: the workers that are dead for good (their restart
        budget spent) or whose engine stopped on an error, each with its cause. Also: predicted,
        rate (frames/s since the previous call), mean batch, lag (sum over workers), latency p50
        and p99 of all the workers' predictions (their histograms merged), and `controller`: the
        controller's status (autoscaling policy and last decision, metrics endpoint, targets file)."""
        per = self.workers()
        ok = [s for s in per if "predicted" in s]
        predicted = sum(s["predicted"] for s in ok)
        now = time.monotonic()
        rate = None
        if self._last is not None and now > self._last[0]:
            rate = max(0.0, (predicted - self._last[1]) / (now - self._last[0]))
        self._last = (now, predicted)
        batches = sum(s["batches"] for s in ok)
        lags = [s["lag"] for s in ok if s["lag"] >= 0]
        latency = merged_quantiles([s.get("latency_ms_counts", []) for s in ok], (0.5, 0.99))
        return {
            "workers": len(per),
            "running": sum(1 for s in per if s.get("running")),
            "nodes": len({s["node_id"] for s in ok}),
            "consumed": sum(s["consumed"] for s in ok),
            "predicted": predicted,
            "dead_lettered": sum(s["dead_lettered"] for s in ok),
            "rate": rate,
            "mean_batch": sum(s["batched_frames"] for s in ok) / batches if batches else 0.0,
            "batch_limits": [s["batch_limit"] for s in ok],
            "lag": sum(lags) if lags else None,
            "latency_p50_ms": latency[0],
            "latency_p99_ms": latency[1],
            "restarts": sum(s.get("restarts", 0) for s in ok),
            "failed": {s["actor"]: s["error"] for s in per if s.get("error")},
            "controller": self._controller_status() if with_controller else None,
            "per_worker": per,
        }

    def _controller_status(self) -> dict | None:
        controller = self.controller()
        if controller is None:
            return None
        try:
            return ray.get(controller.status.remote(), timeout=10)
        except Exception as e:  # restarting: say so rather than fail the stats
            return {"error": _death_cause(e)}

    def stop(self) -> list[dict]:
        """Stops the controller, then every actor gracefully (last batch, commit, leave the group);
        returns the workers' final stats."""
        controller = self.controller()
        if controller is not None:
            try:
                ray.get(controller.shutdown.remote(), timeout=30)
            except Exception:  # dead already: nothing to stop
                pass
            ray.kill(controller, no_restart=True)
        self._refresh()
        actors = [self.actors.pop(i) for i in sorted(self.actors)]
        return self._stop_actors(actors)

    def start_controller(self, autoscale: dict | None = None, shipped: shipping.Bundle | None = None,
                         kafka_secrets: dict | None = None, interval_s: float = CONTROL_INTERVAL_S):
        """Starts the deployment's controller on the head node: it lists the workers' metrics
        endpoints for Prometheus, runs rolling updates and, given `autoscale` (the arguments of
        :class:`kafray.autoscale.LagAutoscaler`), sizes the deployment to its lag."""
        if autoscale is not None:
            LagAutoscaler(**autoscale)  # a bad setting fails here, in the caller
        head = cluster_nodes()[0]["NodeID"]
        options = dict(name=f"{self.name}-controller", num_cpus=0, max_restarts=-1, max_concurrency=4,
                       scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=True))
        if self.detached:
            options["lifetime"] = "detached"
        spec = {"config": self.config, "num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                "max_restarts": self.max_restarts, "model": self.model, "secrets": self.with_secrets}
        controller = DeploymentController.options(**options).remote(self.name, spec, autoscale, interval_s)
        if shipped is not None:
            ray.get(controller.add_model.remote(shipped), timeout=READY_TIMEOUT_S)
        if kafka_secrets:
            ray.get(controller.add_secrets.remote(kafka_secrets), timeout=READY_TIMEOUT_S)
        ray.get(controller.status.remote(), timeout=READY_TIMEOUT_S)
        return controller


@ray.remote
class DeploymentController:
    """One per deployment, on the head node. Every CONTROL_INTERVAL_S it reads the workers' stats,
    writes the Prometheus targets (file_sd) for their /metrics endpoints and its own, and with an
    autoscale policy, scales the deployment to the policy's decision. Rolling updates run here
    too, so one place changes the deployment's size at a time."""

    def __init__(self, name: str, spec: dict, autoscale: dict | None, interval_s: float):
        import prometheus_client as prom

        self.name, self.interval_s = name, interval_s
        # Workers it adds are detached: Ray would otherwise end them with this actor if it died.
        # `stop()` and `kafray-ray down` end them by name.
        self.deployment = Deployment(name, spec["config"], spec["num_cpus"], spec["num_gpus"], True,
                                     spec["max_restarts"], spec["model"], spec.get("secrets", False))
        # Restarted: the secrets the driver gave, from this host (see kafray.secrets).
        self.kafka_secrets_held = secrets.load(name)
        self.deployment._refresh()
        if self.deployment.actors:  # restarted: the workers say what they run now (after an update, say)
            newest = ray.get(self.deployment.actors[max(self.deployment.actors)].spec.remote(), timeout=30)
            self.deployment.config, self.deployment.model = newest["config"], newest.get("model")
            self.deployment.with_secrets = newest.get("secrets", self.deployment.with_secrets)
        self.model_refs: dict = {}
        self.policy = LagAutoscaler(**autoscale) if autoscale else None
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.history: collections.deque[dict] = collections.deque(maxlen=HISTORY_TURNS)
        self.last: dict | None = None
        self.partitions = 0
        self.registry = prom.CollectorRegistry()
        labels = ["deployment"]
        self.g_workers = prom.Gauge("kafray_deployment_workers", "Workers in the deployment.", labels,
                                    registry=self.registry)
        self.g_running = prom.Gauge("kafray_deployment_workers_running", "Workers running now.", labels,
                                    registry=self.registry)
        self.g_desired = prom.Gauge("kafray_autoscale_desired_workers",
                                    "Workers the autoscaler wants now (the target once its delay passed).",
                                    labels, registry=self.registry)
        self.g_target = prom.Gauge("kafray_autoscale_target_workers",
                                   "Workers the autoscaling rule asks for at this moment.", labels,
                                   registry=self.registry)
        self.g_lag = prom.Gauge("kafray_autoscale_lag_frames", "Total lag the last decision saw.", labels,
                                registry=self.registry)
        self.c_decisions = prom.Counter("kafray_autoscale_decisions", "Scalings, by direction and by the "
                                        "objective that set the target.", labels + ["direction", "objective"],
                                        registry=self.registry)
        self.server, _ = prom.start_http_server(0, addr=ray.util.get_node_ip_address(), registry=self.registry)
        self.endpoint = f"{ray.util.get_node_ip_address()}:{self.server.server_port}"
        self.targets_file = os.path.join(ray._private.worker._global_node.get_temp_dir_path(),
                                         f"kafray_{name}_prom_service_discovery.json")
        threading.Thread(target=self._loop, name="kafray-controller", daemon=True).start()

    def _loop(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                with self.lock:
                    self._tick()
            except Exception as e:  # a worker restarting, a slow GCS: try again next turn
                self.last = {**(self.last or {}), "error": _death_cause(e)}

    def _tick(self) -> None:
        s = self.deployment.stats(with_controller=False)
        self._write_targets(s["per_worker"])
        self.partitions = max(self.partitions, sum(w.get("assigned_partitions", 0) for w in s["per_worker"]))
        self.g_workers.labels(self.name).set(s["workers"])
        self.g_running.labels(self.name).set(s["running"])
        record = {"t": time.time(), "workers": s["workers"], "running": s["running"], "lag": s["lag"],
                  "rate": s["rate"], "predicted": s["predicted"]}
        if self.policy is not None:
            d = self.policy.decide(time.monotonic(), s["workers"], s["lag"], s["rate"], self.partitions or None)
            self.g_desired.labels(self.name).set(d.desired)
            self.g_target.labels(self.name).set(d.target)
            if d.lag is not None:
                self.g_lag.labels(self.name).set(d.lag)
            record.update(desired=d.desired, target=d.target, action=d.action, objective=d.objective,
                          reason=d.reason)
            if d.action != "hold":
                print(f"kafray-ray controller: {d.action} {d.current} -> {d.desired} workers: {d.reason}",
                      flush=True)
                self.c_decisions.labels(self.name, d.action, d.objective).inc()
                self.deployment.scale(d.desired)
        self.last = record
        self.history.append(record)

    def _write_targets(self, per_worker: list[dict]) -> None:
        """Prometheus file_sd, beside Ray's own prom_metrics_service_discovery.json."""
        groups = [{"targets": [self.endpoint], "labels": {"kafray_deployment": self.name, "kafray_role": "controller"}}]
        groups += [{"targets": [w["metrics_endpoint"]],
                    "labels": {"kafray_deployment": self.name, "kafray_role": "worker", "actor": w["actor"]}}
                   for w in per_worker if w.get("metrics_endpoint")]
        # Whole (Prometheus never reads half a file), and through a temporary file of a random
        # name: others can write parts of /tmp/ray, so a predictable one could be a planted link.
        write_file_atomically(self.targets_file, json.dumps(groups).encode())

    def status(self) -> dict:
        return {"policy": self.policy.settings() if self.policy else None, "last": self.last,
                "metrics_endpoint": self.endpoint, "targets_file": self.targets_file,
                "model": self.deployment.model, "pid": os.getpid()}

    def get_history(self) -> list[dict]:
        return list(self.history)

    def add_model(self, shipped: shipping.Bundle) -> None:
        """Keeps a model for the workers: in this host's cache (it outlives a restart of this
        actor) and once in Ray's object store."""
        shipping.store(shipped)
        self.model_refs[shipped.digest] = ray.put(shipped)

    def model_ref(self, digest: str) -> list:
        """The shipped model in Ray's object store (in a list: Ray passes the reference on)."""
        if digest not in self.model_refs:  # restarted: from this host's cache
            shipped = shipping.load(digest)
            if shipped is None:
                raise ValueError(f"model {digest[:12]} is not in {shipping.cache_root()} on the controller's host")
            self.model_refs[digest] = ray.put(shipped)
        return [self.model_refs[digest]]

    def add_secrets(self, kafka_secrets: dict) -> None:
        """Keeps the Kafka secrets for the workers: in memory, and readable by this user alone on
        this host (a restart of this actor finds them there)."""
        secrets.store(self.name, kafka_secrets)
        self.kafka_secrets_held = dict(kafka_secrets)
        self.deployment.with_secrets = bool(kafka_secrets)

    def kafka_secrets(self) -> dict:
        """What a worker adds to its Kafka properties at start."""
        if not self.kafka_secrets_held:
            # Restarted on another host than the one that keeps them: say so, not "wrong password".
            raise ValueError(f"deployment {self.name!r}: its Kafka secrets are not on this controller's host "
                             f"({secrets.where(self.name)}): stop the deployment and start it again with them")
        return self.kafka_secrets_held

    def update(self, changes: dict, shipped: shipping.Bundle | None, kafka_secrets: dict | None = None) -> dict:
        if kafka_secrets is not None:
            self.add_secrets(kafka_secrets)
        if shipped is not None:
            self.add_model(shipped)
        model = shipped.key if shipped else None
        with self.lock:
            return self.deployment._roll(changes, model)

    def shutdown(self) -> None:
        self.stopping.set()
        with self.lock:  # a decision in progress finishes first
            pass
        try:
            os.remove(self.targets_file)
        except FileNotFoundError:
            pass
        secrets.remove(self.name)
        self.server.shutdown()


# ---- batch mode (the paper's section II): one task per file, round-robin over nodes ----

@ray.remote(num_cpus=1, max_retries=3)
def _classify_task(shard: list, model: str, batch_size: int) -> dict:
    # The shard comes as [ref] so that fetching it from the object store is timed as reading.
    start = time.time()
    name, images, labels = ray.get(shard[0])
    record = batch.classify_shard_record(name, images, labels, model, batch_size, start, time.time() - start)
    record["node_id"] = ray.get_runtime_context().get_node_id()
    return record


def ship_shards(paths: list[str]) -> list:
    """Each MNIST shard (images and labels) into Ray's object store: no node reads a shared folder."""
    refs = []
    for p in paths:
        with open(p, "rb") as f:
            images = f.read()
        with open(_native.mnist_shard_labels(p), "rb") as f:
            labels = f.read()
        refs.append(ray.put((os.path.basename(p), images, labels)))
    return refs


def classify_files(paths: list[str], *, nodes: int | None = None, model: str = "mnist", batch_size: int = 64,
                   address: str | None = "auto") -> dict:
    """Classifies every file with one Ray task each, task i pinned to node i mod `nodes` (the
    paper's round-robin). The driver ships the files through Ray's object store first. Returns
    {"records": one per task (file, node, worker pid, start, end, images, correct, error, read_s,
    evaluate_s), "began": submission time (epoch s), "wall_s": to the last result, "launch_s":
    starting a worker per node with the model loaded, "ship_s": putting the files in the store}."""
    connect(address)
    alive = cluster_nodes()
    if nodes is None:
        nodes = len(alive)
    if not 1 <= nodes <= len(alive):
        raise ClusterTooSmall(f"asked for {nodes} node(s); the cluster has {len(alive)} with CPUs")
    chosen = alive[:nodes]
    label = {n["NodeID"]: f"node-{i + 1}" for i, n in enumerate(chosen)}
    model_path = kafray.find_model(model)
    shipping_began = time.time()
    shards = ship_shards(paths)
    ship_s = time.time() - shipping_began

    def on(node: dict):
        return _classify_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))

    # Launch (the paper's first part): a worker process per node with the model loaded.
    launching = time.time()
    ray.get([on(n).remote([shards[0]], model_path, batch_size) for n in chosen])
    launch_s = time.time() - launching
    began = time.time()
    refs = [on(chosen[i % nodes]).remote([s], model_path, batch_size) for i, s in enumerate(shards)]
    records = ray.get(refs)
    wall = time.time() - began
    by_name = {os.path.basename(p): p for p in paths}
    for r in records:
        r["engine"] = "ray"
        r["node"] = label.get(r.pop("node_id"), "other")
        r["worker"] = f"{r['node']}/pid-{r['pid']}"
        r["file"] = by_name[r["file"]]
    return {"records": records, "began": began, "wall_s": wall, "launch_s": launch_s, "ship_s": ship_s}


# ---- CLI ----

def _add_worker_flags(up: argparse.ArgumentParser) -> None:
    """One flag per field of the worker's configuration (`kafray._native.WORKER_CONFIG_FIELDS`),
    each with that field as its `dest`; a test checks that none is missing. Unset flags are left
    to the worker's own layers (its KAFRAY_<FIELD> variables, then the defaults)."""
    w = up.add_argument_group("worker settings (as `kafray worker`; default: the worker's)")
    w.add_argument("--brokers", "-b", default=os.environ.get("KAFRAY_BROKERS"), help="bootstrap servers")
    w.add_argument("--input-topic", "--input", "-i", dest="input_topic", help="where frames arrive (frames)")
    w.add_argument("--output-topic", "--output", "-o", dest="output_topic", help="where predictions go (predictions)")
    w.add_argument("--dead-letter-topic", dest="dead_letter_topic", help="where bad frames go (<input>.dlq)")
    w.add_argument("--group", "-g", help="consumer group (default: --name)")
    w.add_argument("--model", "-m", default="mnist", help="model path or name, on this machine: it is shipped to the nodes")
    w.add_argument("--batch-size", dest="batch_size", type=int, help="largest micro-batch (10)")
    w.add_argument("--max-wait-ms", dest="max_wait_ms", type=int, help="optional fill wait for a partial batch (0)")
    w.add_argument("--latency-target-ms", dest="latency_target_ms", type=int,
                   help="optional latency objective in each worker: the batch limit follows it (AIMD)")
    w.add_argument("--threads", type=int, help="ONNX Runtime threads per worker (default: --num-cpus)")
    w.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cuda with --num-gpus, else cpu); "
                                    "on Ray, cuda is the GPU Ray gives the actor")
    w.add_argument("--top-k", dest="top_k", type=int, help="classes listed per prediction (5)")
    w.add_argument("--max-in-flight", dest="max_in_flight", type=int,
                   help="frames between poll and acknowledgement per worker (1000)")
    w.add_argument("--stall-after-s", dest="stall_after_s", type=int, metavar="S",
                   help="seconds an owned partition may make no progress (frames without a result, or left "
                        "unread while the worker idles) before it counts as stalled: logged, counted, /healthz "
                        "fails (30; 0 turns the watchdog off)")
    w.add_argument("--status-interval", dest="status_interval_s", type=int,
                   help="seconds between each worker's status lines in its log (5)")
    w.add_argument("--worker-id", dest="worker_id",
                   help="prefix of the workers' names in predictions (default: the actor's name)")
    w.add_argument("--metrics-addr", dest="metrics_addr", metavar="ADDR",
                   help="each worker's Prometheus endpoint (default on Ray: its node's address, on a free "
                        "port, listed in the deployment's Prometheus targets file)")
    w.add_argument("--create-topics", dest="create_topics", type=int, metavar="P",
                   help="create missing input/output topics with P partitions (else a missing one fails the start)")
    w.add_argument("-X", dest="kafka", action="append", metavar="KEY=VALUE",
                   help="librdkafka property (repeatable); a value may be ${env:NAME} or ${file:PATH:KEY}, resolved on "
                        "the worker's node")
    w.add_argument("--kafka-config", dest="kafka_config", metavar="FILE",
                   default=os.environ.get("KAFRAY_KAFKA_CONFIG"),
                   help="client.properties file of librdkafka properties, read here (-X wins over it); its "
                        "secrets reach the workers through the controller, never in an actor's arguments")
    w.add_argument("--insecure-skip-tls-verify", dest="insecure_skip_tls_verify", action="store_true", default=None,
                   help="accept properties that turn TLS certificate or hostname verification off")


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
    if args.workers is not None and not low <= args.workers <= high:
        p.error(f"--workers {args.workers} is outside --autoscale {args.autoscale}")
    return settings


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
    a = up.add_argument_group("autoscaling (KEDA's Kafka rule, Ray Serve's delays)")
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
    up.add_argument("--detach", action="store_true", help="start and return; the actors outlive this command")
    up.add_argument("--interval", type=float, default=5.0, help="seconds between stats lines")
    up.add_argument("--duration", type=float, help="stop after this many seconds")
    up.add_argument("--json", action="store_true", help="print stats as JSON lines")

    st = sub.add_parser("stats", parents=[common], help="stats of a detached deployment")
    st.add_argument("--json", action="store_true")
    sc = sub.add_parser("scale", parents=[common], help="grow or shrink a detached deployment")
    sc.add_argument("workers", type=int)
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
            d = Deployment.attach(args.name, args.address)
            d.scale(args.workers)
            print(f"kafray-ray: {args.name!r} now has {len(d.actors)} worker(s)")
        elif args.cmd == "down":
            finals = Deployment.attach(args.name, args.address).stop()
            print(f"kafray-ray: {args.name!r} stopped ({len(finals)} worker(s))")
        elif args.cmd == "update":
            done = Deployment.attach(args.name, args.address).update(model=args.model)
            print(f"kafray-ray: {args.name!r} now runs {done['model']} "
                  f"({len(done['replaced'])} worker(s) replaced one by one)")
        elif args.cmd == "batch":
            from kafray import study
            return study.main(["--engines", "ray", "--files", str(args.files), "--per-file", str(args.per_file),
                               "--out", args.out, "--model", args.model, "--address", args.address]
                              + (["--nodes", str(args.nodes)] if args.nodes else []))
    except (ValueError, ClusterTooSmall) as e:
        print(f"kafray-ray: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
