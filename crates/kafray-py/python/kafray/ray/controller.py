"""The one owner of a kafray deployment on Ray, shaped like Ray Serve's controller.

It holds the deployment's target state: the workers' configuration and model (a *version*),
how many workers (`replicas`), and the autoscaling policy. The target lives in Ray's internal KV
store (:func:`kafray.ray.cluster.write_record`), with the counter that names the actors, so a
restarted controller reads it back and goes on. This is the only code that creates, stops or
replaces worker actors. Every turn it reconciles the actors that run against the target:

- a worker that died (its restart budget spent), failed (its thread ended on an error while its
  process lives), stalled past a limit, or did not answer its health check in time is replaced,
  and the replacement is counted with its reason;
- missing workers are started and extra ones stopped (gracefully: they finish what is in flight,
  commit and leave the group);
- workers of an older version are rolled forward one at a time: a new one joins, then an old
  one drains;
- with a policy, the autoscaler sets `replicas` from the lag.

The handle (:class:`kafray.ray.handle.Deployment`) only sets the target and waits.
"""
from __future__ import annotations

import collections
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kafray import secrets, shipping
from kafray.autoscale import LagAutoscaler
from kafray.files import write_file_atomically
from kafray.ray.actor import KafrayWorkerActor
from kafray.ray.cluster import (READY_TIMEOUT_S, ClusterTooSmall, actor_name, check_resources, death_cause,
                                delete_record, read_record, totals, write_record)

# A turn while nothing is in progress; while workers start, stop or roll, turns come faster.
CONTROL_INTERVAL_S = 2.0
BUSY_INTERVAL_S = 0.25
# Ray Serve's health check, tighter: asked every period, an answer later than the timeout counts
# as a failed check, and the worker is replaced.
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 10.0
# A worker whose own watchdog reports a stalled partition this long is replaced (unless every
# worker is stalled: then the cause is outside them, the broker say, and new ones would not help).
STALLED_LIMIT_S = 30.0
# Ray restarts a worker whose process died; one still restarting after this is replaced.
RESTARTING_LIMIT_S = 60.0
# A graceful stop (last batch, commit, leave) that takes longer is cut short: the frames it had
# in flight were never committed, so the group reads them again.
STOP_TIMEOUT_S = 60.0
# This many workers in a row that fail to start put the deployment in "failed": it stops trying
# until the target changes, rather than starting failing workers for ever.
MAX_START_FAILURES = 3
# The record of turns (stats and decisions) keeps the last day at the normal interval.
HISTORY_TURNS = 43_200
REPLACEMENTS_KEPT = 100


@dataclass
class Replica:
    """One worker actor as the controller tracks it."""
    name: str
    index: int
    version: int
    handle: Any
    created: float = field(default_factory=time.monotonic)
    phase: str = "starting"  # starting (ready() pending), running, stopping
    ready_ref: Any = None
    info: dict | None = None  # ready()'s answer
    health: dict | None = None  # the last health check's answer
    health_ref: Any = None
    health_sent: float = 0.0
    health_at: float = 0.0
    restarting_since: float | None = None
    stalled_since: float | None = None
    stop_ref: Any = None
    stop_deadline: float = 0.0
    ever_joined: bool = False

    @property
    def joined(self) -> bool:
        """Running, and a member of its group (the worker's readiness)."""
        return self.phase == "running" and bool(self.health) and bool(self.health.get("joined"))


def actor_state(handle) -> str:
    """What the GCS says of an actor: ALIVE, RESTARTING, DEAD, PENDING_CREATION, ..."""
    try:
        return ray._private.state.actors(actor_id=handle._actor_id.hex()).get("State", "UNKNOWN")
    except Exception:  # the GCS is busy: not known this turn
        return "UNKNOWN"


@ray.remote
class DeploymentController:
    """One per deployment, on the head node (see the module's docstring)."""

    def __init__(self, name: str, target: dict, interval_s: float = CONTROL_INTERVAL_S):
        import prometheus_client as prom

        self.name, self.interval_s = name, interval_s
        # Restarted by Ray: the record in the GCS is newer than the arguments it began with.
        self.record = read_record(name) or target
        self.record.setdefault("generation", 0)
        self.record.setdefault("actors", {})
        self.record.setdefault("stopping", [])
        self.kafka_secrets_held = secrets.load(name)
        self.model_refs: dict = {}
        self.policy = LagAutoscaler(**self.record["autoscale"]) if self.record.get("autoscale") else None
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.replicas: dict[str, Replica] = {}
        self.replacements: collections.deque[dict] = collections.deque(maxlen=REPLACEMENTS_KEPT)
        self.replaced_total = 0
        self.start_failures: list[dict] = []  # in a row; cleared by a worker that gets ready
        self.status_text, self.error = "deploying", None
        self.history: collections.deque[dict] = collections.deque(maxlen=HISTORY_TURNS)
        self.last: dict | None = None
        self.last_health_round = 0.0
        self.start_backoff_until = 0.0
        self.too_small_since: float | None = None
        self.finals: collections.deque[dict] = collections.deque(maxlen=1000)
        self.rolled: dict[int, list[str]] = {}  # per version: the older workers it replaced
        self.partitions = 0
        self.rate_base: tuple[float, int] | None = None
        self._adopt()
        write_record(name, self.record)

        self.registry = prom.CollectorRegistry()
        labels = ["deployment"]
        self.g_workers = prom.Gauge("kafray_deployment_workers", "Workers in the deployment.", labels,
                                    registry=self.registry)
        self.g_running = prom.Gauge("kafray_deployment_workers_running", "Workers running now.", labels,
                                    registry=self.registry)
        self.g_replicas = prom.Gauge("kafray_deployment_target_workers", "Workers the target asks for.", labels,
                                     registry=self.registry)
        self.c_replaced = prom.Counter("kafray_deployment_replacements", "Workers replaced by the controller, "
                                       "by reason (died, failed, stalled, unresponsive, restarting).",
                                       labels + ["reason"], registry=self.registry)
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

    # ---- the target: set by the handle, kept in the GCS ----

    def _save(self) -> None:
        write_record(self.name, self.record)

    def _changed(self) -> int:
        """A new target: it gets a generation (the handle waits for it), and a fresh start."""
        self.record["generation"] += 1
        self.start_failures.clear()
        self.start_backoff_until, self.too_small_since = 0.0, None
        self.status_text, self.error = "deploying", None
        self._save()
        self.wake.set()
        return self.record["generation"]

    def set_target(self, replicas: int | None = None, autoscale: dict | None = None,
                   autoscale_off: bool = False) -> int:
        """Sets how many workers the deployment runs, or its autoscaling bounds and objective.
        A fixed size while the autoscaler owns the size is refused: it would undo it at its
        next decision. Returns the target's generation (see `progress`)."""
        with self.lock:
            # Everything is checked before anything changes: a refused call leaves the target as it was.
            policy = LagAutoscaler(**autoscale) if autoscale is not None else None
            if replicas is not None:
                if replicas < 0:
                    raise ValueError(f"workers {replicas}: must be >= 0")
                if self.policy is not None and not autoscale_off:
                    p = self.policy
                    raise ValueError(
                        f"deployment {self.name!r} autoscales between {p.min_workers} and {p.max_workers} workers, "
                        f"and the autoscaler would undo a fixed size at its next decision: change the bounds "
                        f"(kafray-ray scale --autoscale MIN:MAX --lag-threshold FRAMES; {replicas}:{replicas} holds "
                        f"{replicas}) or turn autoscaling off (kafray-ray scale {replicas} --no-autoscale)")
                grow = replicas - len(self._current())
                if grow > 0:
                    check_resources(grow, self.record["num_cpus"], self.record["num_gpus"])
            if policy is not None:
                self.record["autoscale"], self.policy = autoscale, policy
                current = self.record["replicas"]
                self.record["replicas"] = min(max(current, policy.min_workers), policy.max_workers)
            elif autoscale_off:
                self.record["autoscale"], self.policy = None, None
            if replicas is not None:
                self.record["replicas"] = replicas
            return self._changed()

    def update(self, changes: dict, shipped: shipping.Bundle | None, kafka_secrets: dict | None = None) -> int:
        """A new version of the workers' configuration (a new model, say): the reconcile loop
        rolls the workers forward to it one at a time. If a worker of it cannot start, the
        target goes back to the version before, and the workers already replaced roll back."""
        if kafka_secrets is not None:
            self.add_secrets(kafka_secrets)
        if shipped is not None:
            self.add_model(shipped)
        with self.lock:
            spec = self.record["spec"]
            version = self.record["next_version"]
            self.record["next_version"] = version + 1
            if self.record.get("previous") is None:  # else a roll is under way: back to where it began
                self.record["previous"] = spec
            self.record["spec"] = {"version": version, "config": {**spec["config"], **changes},
                                   "model": shipped.key if shipped else spec["model"]}
            self.record["rolled_back"] = None
            return self._changed()

    def begin(self) -> int:
        """The handle gave the model and the secrets: workers may start now."""
        with self.lock:
            self.record["paused"] = False
            return self._changed()

    def progress(self) -> dict:
        """Where reconciliation stands: `converged` once the workers that run are the target's
        (its version, its count, each a member of its group) and none is stopping; `status`
        (deploying, running, failed), and `error` with its `error_kind` once it failed."""
        with self.lock:
            return self._progress()

    def _progress(self) -> dict:
        current = self._current()
        version = self.record["spec"]["version"]
        converged = (len(current) == self.record["replicas"] and not self.record["stopping"]
                     and all(r.version == version and r.joined for r in current))
        return {"generation": self.record["generation"], "converged": converged, "status": self.status_text,
                "error": self.error, "version": version, "replicas": self.record["replicas"],
                "rolled_back": self.record.get("rolled_back"), "replaced": self.rolled.get(version, []),
                "workers": {r.name: {"phase": r.phase, "version": r.version,
                                     "state": (r.health or {}).get("state")} for r in list(self.replicas.values())}}

    # ---- the reconcile loop ----

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                with self.lock:
                    busy = self._turn()
            except Exception as e:  # a slow GCS, say: try again next turn
                busy = False
                self.last = {**(self.last or {}), "error": death_cause(e)}
                print(f"kafray-ray controller {self.name}: turn failed: {death_cause(e)}", flush=True)
            self.wake.wait(BUSY_INTERVAL_S if busy else self.interval_s)
            self.wake.clear()

    def _current(self) -> list[Replica]:
        return [r for r in list(self.replicas.values()) if r.phase in ("starting", "running")]

    def _turn(self) -> bool:
        if self.stopping.is_set():
            return False
        now = time.monotonic()
        self._follow_starting(now)
        self._follow_health(now)
        self._follow_stopping(now)
        if now - self.last_health_round >= HEALTH_CHECK_PERIOD_S:
            self.last_health_round = now
            self._health_round(now)
        self._act(now)
        progress = self._progress()
        if progress["converged"] and self.status_text == "deploying":
            self.status_text, self.error = "running", None
            if self.record.get("previous") is not None:
                self.record["previous"] = None  # the roll is done: nothing to go back to
                self._save()
        if self.status_text in ("failed",) or self.record.get("paused"):
            return False
        return bool(self.record["stopping"] or not progress["converged"])

    def _adopt(self) -> None:
        """A restarted controller takes over the actors its record names; those gone are missing
        and will be started anew, those it was stopping are stopped."""
        for name, meta in list(self.record["actors"].items()):
            try:
                handle = ray.get_actor(name)
            except ValueError:
                self.record["actors"].pop(name)
                continue
            # Running already: its health checks decide, as for any running worker.
            self.replicas[name] = Replica(name, meta["index"], meta["version"], handle, phase="running",
                                          ever_joined=True)
        for name in list(self.record["stopping"]):
            r = self.replicas.get(name)
            if r is None:
                self.record["stopping"].remove(name)
            else:
                self._begin_stop(r)

    def _start(self, version_spec: dict, count: int) -> None:
        """Starts `count` workers of `version_spec`; their names come from the counter in the record."""
        if count <= 0:
            return
        rec = self.record
        check_resources(count, rec["num_cpus"], rec["num_gpus"])
        for _ in range(count):
            index = rec["next_index"]
            rec["next_index"] = index + 1
            name = actor_name(self.name, index)
            rec["actors"][name] = {"index": index, "version": version_spec["version"]}
            self._save()  # before the actor exists: a restarted controller never reuses its name
            options = dict(name=name, num_cpus=rec["num_cpus"], num_gpus=rec["num_gpus"], scheduling_strategy="SPREAD",
                           max_restarts=rec["max_restarts"])
            if rec["detached"]:
                # A detached deployment's workers outlive a restart of this controller (Ray would
                # end the actors it owns with it otherwise).
                options["lifetime"] = "detached"
            placement = {"num_cpus": rec["num_cpus"], "num_gpus": rec["num_gpus"], "max_restarts": rec["max_restarts"],
                         "model": version_spec["model"], "secrets": rec["secrets"], "version": version_spec["version"]}
            handle = KafrayWorkerActor.options(**options).remote(self.name, version_spec["config"], placement, name)
            r = Replica(name, index, version_spec["version"], handle)
            r.ready_ref = handle.ready.remote()
            self.replicas[name] = r

    def _start_failed(self, r: Replica, error: str, kind: str) -> None:
        self.start_failures.append({"actor": r.name, "error": error, "error_kind": kind, "version": r.version,
                                    "generation": self.record["generation"]})
        print(f"kafray-ray controller {self.name}: {r.name} could not start: {error}", flush=True)
        self._forget(r, kill=True)
        spec = self.record["spec"]
        rolling = any(x.version != spec["version"] for x in self._current())
        if r.version == spec["version"] and self.record.get("previous") and rolling:
            # A new version that cannot start: back to the one before; those replaced roll back.
            self.record["rolled_back"] = {"from": spec["version"], "error": error, "error_kind": kind,
                                          "generation": self.record["generation"]}
            self.record["spec"], self.record["previous"] = self.record["previous"], None
            self._save()
            return
        failure = {"error": error, "error_kind": kind, "actor": r.name}
        if self.status_text == "deploying" and (len(self.start_failures) >= MAX_START_FAILURES
                                                or kind in ("user", "cluster")):
            # The target cannot be reached: the caller waiting for it gets this error, and the
            # controller waits for a new target instead of starting failing workers for ever.
            self.status_text, self.error = "failed", failure
        else:
            # A replacement or an autoscaled start that failed while the deployment runs: try
            # again, later each time (an outage outside the workers may pass).
            self.error = failure
            self.start_backoff_until = time.monotonic() + min(60.0, 2.0 ** len(self.start_failures))

    def _follow_starting(self, now: float) -> None:
        for r in [r for r in list(self.replicas.values()) if r.phase == "starting"]:
            done, _ = ray.wait([r.ready_ref], timeout=0)
            if not done:
                if now - r.created > READY_TIMEOUT_S:
                    if actor_state(r.handle) in ("PENDING_CREATION", "DEPENDENCIES_UNREADY"):
                        self._start_failed(r, f"not placed within {READY_TIMEOUT_S:.0f} s; the cluster has "
                                              f"{ray.available_resources()} free", "cluster")
                    else:
                        self._start_failed(r, f"did not start within {READY_TIMEOUT_S:.0f} s", "internal")
                continue
            try:
                r.info = ray.get(r.ready_ref)
            except Exception as e:
                self._start_failed(r, death_cause(e), "internal")
                continue
            r.ready_ref = None
            if r.info.get("error"):
                self._start_failed(r, r.info["error"], r.info.get("error_kind", "internal"))
                continue
            r.phase = "running"

    def _follow_health(self, now: float) -> None:
        for r in [r for r in list(self.replicas.values()) if r.phase == "running"]:
            if r.health_ref is None:
                # Asked every period; more often while it has not joined yet (a roll waits on it).
                if now - r.health_at >= HEALTH_CHECK_PERIOD_S or not r.joined:
                    r.health_ref, r.health_sent = r.handle.check_health.remote(), now
                continue
            done, _ = ray.wait([r.health_ref], timeout=0)
            if not done:
                if now - r.health_sent > HEALTH_CHECK_TIMEOUT_S:
                    state = actor_state(r.handle)
                    if state == "ALIVE":
                        self._replace(r, "unresponsive",
                                      f"did not answer its health check within {HEALTH_CHECK_TIMEOUT_S:g} s")
                    elif state == "DEAD":
                        self._replace(r, "died", "its actor is dead")
                    else:  # restarting, or the GCS could not say: look again next turn
                        self._restarting(r, now)
                        r.health_ref = None
                continue
            ref, r.health_ref = r.health_ref, None
            try:
                health = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                # Ray restarts a process that died, within its budget: the worker comes back as
                # the same static member. Dead for good, it is replaced.
                if actor_state(r.handle) == "DEAD":
                    self._replace(r, "died", death_cause(e))
                else:
                    self._restarting(r, now)
                continue
            except Exception as e:  # the check itself failed: a missed check, as one not answered
                if now - max(r.health_at, r.created) > HEALTH_CHECK_TIMEOUT_S:
                    self._replace(r, "unresponsive", f"its health checks fail: {death_cause(e)}")
                continue
            r.restarting_since, r.health, r.health_at = None, health, now
            health["actor"] = r.name
            if health.get("state") in ("failed", "stopped") or not health.get("running", True):
                why = health.get("error") or health.get("state_reason") or f"the worker {health.get('state')}"
                if r.ever_joined:
                    self._replace(r, "failed", why)
                else:
                    self._start_failed(r, why, health.get("error_kind") or "internal")
                continue
            if health.get("joined") and not r.ever_joined:
                r.ever_joined = True
                self.start_failures.clear()
            stalled = health.get("stalled_partitions") or []
            r.stalled_since = (r.stalled_since or now) if stalled else None

    def _restarting(self, r: Replica, now: float) -> None:
        r.restarting_since = r.restarting_since or now
        if now - r.restarting_since > RESTARTING_LIMIT_S:
            self._replace(r, "restarting", f"still restarting after {RESTARTING_LIMIT_S:g} s")

    def _health_round(self, now: float) -> None:
        """Stalls, the autoscaler, service discovery and the record of the turn, from the last
        health checks."""
        running = [r for r in list(self.replicas.values()) if r.phase == "running"]
        stalled = [r for r in running if r.stalled_since is not None]
        if stalled and len(stalled) < len(running):  # everyone stalled: the cause is outside them
            for r in stalled:
                if now - r.stalled_since > STALLED_LIMIT_S:
                    parts = r.health.get("stalled_partitions")
                    self._replace(r, "stalled", f"partition(s) {parts} made no progress for over "
                                                f"{STALLED_LIMIT_S:g} s past the worker's own stall limit")
        per = [r.health for r in running if r.health]
        t = totals(per)
        self._write_targets(per)
        self.partitions = max(self.partitions, sum(w.get("assigned_partitions", 0) for w in per))
        rate = None
        if self.rate_base is not None and now > self.rate_base[0]:
            rate = max(0.0, (t["predicted"] - self.rate_base[1]) / (now - self.rate_base[0]))
        self.rate_base = (now, t["predicted"])
        current = len(self._current())
        self.g_workers.labels(self.name).set(current)
        self.g_running.labels(self.name).set(t["running"])
        self.g_replicas.labels(self.name).set(self.record["replicas"])
        record = {"t": time.time(), "workers": current, "running": t["running"], "lag": t["lag"], "rate": rate,
                  "predicted": t["predicted"], "replicas": self.record["replicas"]}
        if self.policy is not None and self.status_text != "failed":
            d = self.policy.decide(now, current, t["lag"], rate, self.partitions or None)
            self.g_desired.labels(self.name).set(d.desired)
            self.g_target.labels(self.name).set(d.target)
            if d.lag is not None:
                self.g_lag.labels(self.name).set(d.lag)
            record.update(desired=d.desired, target=d.target, action=d.action, objective=d.objective,
                          reason=d.reason)
            if d.action != "hold" and d.desired != self.record["replicas"]:
                print(f"kafray-ray controller {self.name}: {d.action} {d.current} -> {d.desired} workers: {d.reason}",
                      flush=True)
                self.c_decisions.labels(self.name, d.action, d.objective).inc()
                self.record["replicas"] = d.desired
                self._save()
        self.last = record
        self.history.append(record)

    def _act(self, now: float) -> None:
        """Start the missing, stop the extra, roll the outdated: one step of each per turn."""
        if self.status_text == "failed" or self.record.get("paused"):
            return
        spec, want = self.record["spec"], self.record["replicas"]
        current = self._current()
        outdated = [r for r in current if r.version != spec["version"]]
        fresh = [r for r in current if r.version == spec["version"]]
        try:
            if outdated:
                if any(not r.joined for r in fresh):
                    return  # a new one is still joining: the old ones keep the partitions meanwhile
                if len(current) > want:
                    self._begin_stop(outdated[0])  # its successor has joined: now it drains
                    self.rolled.setdefault(spec["version"], []).append(outdated[0].name)
                elif len(fresh) < want and now >= self.start_backoff_until:
                    self._start(spec, max(1, want - len(current)))
                return
            if len(current) < want:
                if now >= self.start_backoff_until:
                    self._start(spec, want - len(current))
            elif len(current) > want:
                # Those still starting go first, then the newest.
                extra = sorted(current, key=lambda r: (r.phase != "starting", -r.index))[:len(current) - want]
                for r in extra:
                    self._begin_stop(r)
        except ClusterTooSmall as e:
            # Resources of an actor just ended come back a moment later: only a lack that lasts
            # fails a target that is being deployed; a running deployment tries every turn.
            self.error = {"error": str(e), "error_kind": "cluster"}
            self.too_small_since = self.too_small_since or now
            if self.status_text == "deploying" and now - self.too_small_since > HEALTH_CHECK_TIMEOUT_S:
                self.status_text = "failed"
            return
        self.too_small_since = None

    def _replace(self, r: Replica, category: str, reason: str) -> None:
        """Ends a worker that is unhealthy; the next step of `_act` starts its replacement."""
        print(f"kafray-ray controller {self.name}: replacing {r.name} ({category}): {reason}", flush=True)
        self.replaced_total += 1
        self.replacements.append({"t": time.time(), "actor": r.name, "reason": category, "detail": reason})
        self.c_replaced.labels(self.name, category).inc()
        self._forget(r, kill=True)

    def _forget(self, r: Replica, kill: bool) -> None:
        if kill:
            try:
                ray.kill(r.handle, no_restart=True)
            except Exception:  # gone already
                pass
        self.replicas.pop(r.name, None)
        self.record["actors"].pop(r.name, None)
        if r.name in self.record["stopping"]:
            self.record["stopping"].remove(r.name)
        self._save()

    def _begin_stop(self, r: Replica) -> None:
        """A graceful stop: the worker finishes its in-flight frames, commits and leaves the group."""
        if r.name not in self.record["stopping"]:
            self.record["stopping"].append(r.name)
            self._save()
        r.phase = "stopping"
        r.stop_ref = r.handle.stop.remote(STOP_TIMEOUT_S)
        r.stop_deadline = time.monotonic() + STOP_TIMEOUT_S + 10

    def _follow_stopping(self, now: float) -> None:
        for r in [r for r in list(self.replicas.values()) if r.phase == "stopping"]:
            done, _ = ray.wait([r.stop_ref], timeout=0)
            if done or now > r.stop_deadline:
                if done:
                    try:
                        r.health = ray.get(r.stop_ref)
                    except Exception as e:  # failed while stopping: its final stats say so
                        r.health = {"error": death_cause(e)}
                self.finals.append({**(r.health or {}), "actor": r.name})
                self._forget(r, kill=True)

    # ---- what the handle asks ----

    def actor_names(self) -> dict[int, str]:
        """The workers that run now (starting or running), by index."""
        return {r.index: r.name for r in self._current()}

    def workers(self) -> list[dict]:
        """Each worker's stats, asked now, or {"error": ...} while it is down or restarting."""
        current = sorted(self._current(), key=lambda r: r.index)
        refs = [r.handle.stats.remote() for r in current]
        answered, _ = ray.wait(refs, num_returns=len(refs), timeout=10) if refs else ([], [])
        out = []
        for r, ref in zip(current, refs):
            try:
                if ref not in answered:
                    raise TimeoutError(f"no answer within 10 s ({r.phase})")
                s = ray.get(ref)
            except Exception as e:  # starting, restarting, or dead: say why
                s = {"error": death_cause(e), "running": False}
            s["actor"] = r.name
            s["phase"] = r.phase
            out.append(s)
        return out

    def stats(self) -> dict:
        """Totals over the workers (asked now), each worker's stats, and this controller's status."""
        per = self.workers()
        return {**totals(per), "per_worker": per, "controller": self.status()}

    def status(self) -> dict:
        return {"policy": self.policy.settings() if self.policy else None, "last": self.last,
                "metrics_endpoint": self.endpoint, "targets_file": self.targets_file,
                "model": self.record["spec"]["model"], "version": self.record["spec"]["version"],
                "replicas": self.record["replicas"], "status": self.status_text, "error": self.error,
                "replaced": self.replaced_total, "replacements": list(self.replacements)[-20:],
                "start_failures": list(self.start_failures), "rolled_back": self.record.get("rolled_back"),
                "pid": os.getpid()}

    def get_history(self) -> list[dict]:
        return list(self.history)

    def spec(self) -> dict:
        """The target without its secrets: configuration, model, resources, version."""
        rec = self.record
        return {**rec["spec"], "num_cpus": rec["num_cpus"], "num_gpus": rec["num_gpus"],
                "max_restarts": rec["max_restarts"], "secrets": rec["secrets"], "replicas": rec["replicas"],
                "autoscale": rec.get("autoscale"), "detached": rec["detached"]}

    def _write_targets(self, per_worker: list[dict]) -> None:
        """Prometheus file_sd, beside Ray's own prom_metrics_service_discovery.json."""
        groups = [{"targets": [self.endpoint], "labels": {"kafray_deployment": self.name, "kafray_role": "controller"}}]
        groups += [{"targets": [w["metrics_endpoint"]],
                    "labels": {"kafray_deployment": self.name, "kafray_role": "worker", "actor": w["actor"]}}
                   for w in per_worker if w.get("metrics_endpoint")]
        # Whole (Prometheus never reads half a file), and through a temporary file of a random
        # name: others can write parts of /tmp/ray, so a predictable one could be a planted link.
        write_file_atomically(self.targets_file, json.dumps(groups).encode())

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
        with self.lock:
            self.record["secrets"] = bool(kafka_secrets)
            self._save()

    def kafka_secrets(self) -> dict:
        """What a worker adds to its Kafka properties at start."""
        if not self.kafka_secrets_held:
            # Restarted on another host than the one that keeps them: say so, not "wrong password".
            raise ValueError(f"deployment {self.name!r}: its Kafka secrets are not on this controller's host "
                             f"({secrets.where(self.name)}): stop the deployment and start it again with them")
        return self.kafka_secrets_held

    def shutdown(self) -> list[dict]:
        """Stops every worker gracefully (in parallel) and forgets the deployment; returns the
        workers' final stats."""
        self.stopping.set()
        with self.lock:  # a turn in progress finishes first
            for r in list(self.replicas.values()):
                if r.phase != "stopping":
                    self._begin_stop(r)
            deadline = time.monotonic() + STOP_TIMEOUT_S + 10
            while any(r.phase == "stopping" for r in list(self.replicas.values())) and time.monotonic() < deadline:
                self._follow_stopping(time.monotonic())
                time.sleep(0.05)
            for r in list(self.replicas.values()):
                self._forget(r, kill=True)
            delete_record(self.name)
        try:
            os.remove(self.targets_file)
        except FileNotFoundError:
            pass
        secrets.remove(self.name)
        self.server.shutdown()
        return list(self.finals)


def start_controller(name: str, target: dict, detached: bool, interval_s: float = CONTROL_INTERVAL_S):
    """Starts the deployment's controller on the head node (soft: elsewhere if the head is full)."""
    from kafray.ray.cluster import cluster_nodes, controller_name

    head = cluster_nodes()[0]["NodeID"]
    options = dict(name=controller_name(name), num_cpus=0, max_restarts=-1, max_concurrency=8,
                   scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=True))
    if detached:
        options["lifetime"] = "detached"
    return DeploymentController.options(**options).remote(name, target, interval_s)
