"""The handle of a kafray deployment on Ray: a thin client of its controller.

It sets the target (:meth:`Deployment.scale`, :meth:`Deployment.update`) and waits until the
controller (:mod:`kafray.ray.controller`) has reconciled the workers to it; it never creates or
stops a worker itself."""
from __future__ import annotations

import time
from typing import Any

import ray

import kafray
from kafray import _native, secrets, shipping
from kafray.autoscale import LagAutoscaler
from kafray.ray.actor import MAX_RESTARTS
from kafray.ray.cluster import (NAMESPACE, READY_TIMEOUT_S, ClusterTooSmall, DeploymentFailed, check_kafka_for_ray,
                                check_resources, connect, controller, death_cause, delete_record, read_record)
from kafray.ray.controller import HEALTH_CHECK_TIMEOUT_S, start_controller

# How long a call waits for the workers it asked for: the controller gives an actor
# READY_TIMEOUT_S to be placed and started, and its error needs a turn or two to arrive after that.
WAIT_S = READY_TIMEOUT_S + 2 * HEALTH_CHECK_TIMEOUT_S


def _raise(error: dict, what: str) -> None:
    """The controller's error as the exception a plain `kafray worker` would give."""
    text = f"{what}: {error.get('actor', 'a worker')}: {error['error']}"
    kind = error.get("error_kind")
    if kind == "user":
        raise ValueError(text)
    if kind == "cluster":
        raise ClusterTooSmall(text)
    raise DeploymentFailed(text)


class Deployment:
    """N kafray workers as Ray actors, spread over the cluster's nodes, sharing one consumer
    group; their controller owns them."""

    def __init__(self, name: str):
        self.name = name
        self._last: tuple[float, int] | None = None

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
        timeout: float = WAIT_S,
        **config,
    ) -> "Deployment":
        """Starts the deployment's controller with `workers` as its target, and waits until
        they are ready (members of their group): a worker that cannot start fails the call with
        its error (ValueError for a configuration error, as `kafray worker` exits 2), and
        nothing is left running. `config` is :class:`kafray.Worker`'s (brokers, model, ...).
        Ray restarts a worker whose process dies up to `max_restarts` times (-1: without end);
        past that, the controller replaces it. `autoscale`: the arguments of
        :class:`kafray.autoscale.LagAutoscaler` (min_workers, max_workers, lag_threshold, ...).

        The model (with its TOML and labels) is read here and shipped: the controller puts it in
        Ray's object store once, and each host keeps it in a cache named by its content. Kafka
        secrets (a password in `kafka` or in the `kafka_config` file, read here) reach the
        workers through the controller, never in an actor's arguments (see :mod:`kafray.secrets`)."""
        config, kafka_secrets = secrets.split(config)
        check_kafka_for_ray(config)  # before anything starts
        if autoscale is not None:
            LagAutoscaler(**autoscale)  # a bad setting fails before anything starts
        connect(address)
        config.setdefault("group", name)
        config.setdefault("threads", max(1, int(num_cpus)))
        # The actor's share is num_cpus, not the node's cores (which a worker's `auto` would see):
        # on the CPU its inference threads take the share, and the polling thread decodes; with a
        # GPU inferring, the share decodes.
        config.setdefault("decode_threads", max(1, int(num_cpus)) if num_gpus > 0 else 1)
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it gives the actor: "cuda" is GPU 0 of those.
        config.setdefault("device", "cuda" if num_gpus > 0 else "cpu")
        config["model"] = kafray.find_model(config.get("model", "mnist"))
        shipped = shipping.bundle(config["model"])
        config.setdefault("status_interval_s", 5)
        if controller(name) is not None:
            raise ValueError(f"a deployment named {name!r} is running: use `kafray-ray down --name {name}` "
                             f"or another --name")
        leftover = [n for n in ray.util.list_named_actors() if n.startswith(f"{name}-worker-")]
        if leftover:
            raise ValueError(f"{len(leftover)} worker actor(s) of a deployment named {name!r} run without a "
                             f"controller: use `kafray-ray down --name {name}` or another --name")
        delete_record(name)  # a deployment of that name that ended without stopping: forgotten
        check_resources(workers, num_cpus, num_gpus)
        target = {"name": name, "spec": {"version": 1, "config": config, "model": shipped.key}, "next_version": 2,
                  "previous": None, "num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": max_restarts,
                  "secrets": bool(kafka_secrets), "replicas": workers, "autoscale": autoscale, "detached": detached,
                  "next_index": 0, "paused": True}
        d = cls(name)
        # Held: Ray ends a non-detached controller (and the workers it owns) once no handle to it is left.
        d._controller = start_controller(name, target, detached)
        try:
            ray.get(d._controller.add_model.remote(shipped), timeout=READY_TIMEOUT_S)
            if kafka_secrets:
                ray.get(d._controller.add_secrets.remote(kafka_secrets), timeout=READY_TIMEOUT_S)
            generation = ray.get(d._controller.begin.remote(), timeout=READY_TIMEOUT_S)
            d._wait(generation, timeout, "the deployment could not start")
        except BaseException:
            try:
                d.stop()
            except Exception as cleanup:  # the start's own error is the one to see
                print(f"kafray-ray: cleaning up the failed start of {name!r}: {death_cause(cleanup)}", flush=True)
            raise
        return d

    @classmethod
    def attach(cls, name: str = "kafray", address: str | None = "auto") -> "Deployment":
        """Finds a running (detached) deployment by name."""
        connect(address)
        if controller(name) is None:
            raise ValueError(f"no deployment named {name!r} (no controller {name}-controller in namespace "
                             f"{NAMESPACE!r})")
        return cls(name)

    def controller(self):
        """The deployment's controller actor, or None."""
        return controller(self.name)

    def _ask(self, method: str, *args, timeout: float = 60.0, **kwargs):
        c = self.controller()
        if c is None:
            raise ValueError(f"deployment {self.name!r} has no controller: it was stopped")
        return ray.get(getattr(c, method).remote(*args, **kwargs), timeout=timeout)

    def _wait(self, generation: int, timeout: float, what: str) -> dict:
        """Until the controller has reconciled the workers to the target (of this generation or
        a later one); raises the error of a worker that could not start."""
        deadline = time.monotonic() + timeout
        while True:
            p = self._ask("progress", timeout=30)
            rolled = p.get("rolled_back")
            if rolled and rolled.get("generation", -1) >= generation:
                _raise(rolled, f"{what}; the workers went back to the version before")
            if p["status"] == "failed" and p["generation"] >= generation and p.get("error"):
                _raise(p["error"], what)
            if p["converged"] and p["generation"] >= generation:
                return p
            if time.monotonic() > deadline:
                raise DeploymentFailed(f"{what}: not reconciled within {timeout:.0f} s: {p['workers']}; "
                                       f"the cluster has {ray.available_resources()} free")
            time.sleep(0.2)

    @property
    def actors(self) -> dict[int, Any]:
        """The worker actors that run now, by index (from the controller)."""
        return {i: ray.get_actor(n) for i, n in self._ask("actor_names").items()}

    @property
    def config(self) -> dict:
        return self._ask("spec")["config"]

    def scale(self, workers: int | None = None, *, autoscale: dict | None = None, autoscale_off: bool = False,
              timeout: float = WAIT_S) -> dict:
        """Sets the target size and waits until the workers match it: new ones join the group,
        leaving ones finish their in-flight frames, commit and leave. With autoscaling on, a
        fixed size is refused (the autoscaler would undo it): pass `autoscale` (new bounds and
        objective, LagAutoscaler's arguments) or `autoscale_off=True` with `workers`."""
        if workers is not None and workers < 0:
            raise ValueError("workers must be >= 0")
        generation = self._ask("set_target", replicas=workers, autoscale=autoscale, autoscale_off=autoscale_off)
        return self._wait(generation, timeout, f"scaling {self.name!r}")

    def update(self, timeout: float | None = None, **changes) -> dict:
        """Rolls the workers forward to a new version of their configuration (a new `model`,
        say), one at a time: each new worker joins the group before an old one leaves, so the
        group is never empty, and each old one finishes its in-flight frames and commits first.
        Predictions name the model that made them. If a new worker cannot start, the workers
        go back to the version before and this raises its error. A new model is read here and
        shipped like the first. `timeout` (None: a start's wait per worker) bounds the wait."""
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
        config = self.config
        checked = {**config, **changes}
        checked["kafka"] = [[k, v] for k, v in secrets.kafka_properties(checked)
                            if not _native.is_secret_reference(v)]
        kafray.Worker(**checked)
        check_kafka_for_ray({**config, **changes})
        generation = self._ask("update", changes, shipped, kafka_secrets, timeout=READY_TIMEOUT_S)
        # One worker at a time: each may take as long as a start (None: that, per worker).
        workers = max(1, len(self._ask("actor_names")))
        done = self._wait(generation, timeout if timeout is not None else WAIT_S * workers, f"updating {self.name!r}")
        return {"model": checked.get("model"), "version": done["version"], "workers": len(done["workers"]),
                "replaced": done["replaced"]}

    def workers(self) -> list[dict]:
        """Each worker's stats, or {"error": ...} while it is down or restarting."""
        return self._ask("workers")

    def stats(self) -> dict:
        """From the controller: totals over the workers (predicted, mean batch, lag summed,
        latency p50 and p99 of all their predictions with the histograms merged, restarts),
        `failed` (workers whose engine stopped on an error, each with its cause), `per_worker`,
        and `controller`: its status (target, autoscaling policy and last decision, replacements
        with their reasons, metrics endpoint, targets file). `rate`: frames/s since the previous
        call of this handle."""
        s = self._ask("stats")
        now = time.monotonic()
        s["rate"] = None
        if self._last is not None and now > self._last[0]:
            s["rate"] = max(0.0, (s["predicted"] - self._last[1]) / (now - self._last[0]))
        self._last = (now, s["predicted"])
        return s

    def _controller_status(self) -> dict | None:
        try:
            return self._ask("status", timeout=10)
        except Exception as e:  # restarting: say so rather than fail
            return {"error": death_cause(e)}

    def stop(self) -> list[dict]:
        """Stops every worker gracefully (last batch, commit, leave the group), then the
        controller; returns the workers' final stats."""
        c = self.controller()
        finals: list[dict] = []
        if c is not None:
            try:
                finals = ray.get(c.shutdown.remote(), timeout=120)
            except Exception:  # dead already: what it started is ended below
                pass
            ray.kill(c, no_restart=True)
        # What a controller that died without shutting down left behind.
        record = read_record(self.name) or {}
        for name in record.get("actors", {}):
            try:
                ray.kill(ray.get_actor(name), no_restart=True)
            except ValueError:
                pass
        delete_record(self.name)
        secrets.remove(self.name)
        return finals

