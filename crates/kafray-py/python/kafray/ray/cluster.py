"""What every part of a kafray deployment on Ray shares: the connection, the cluster's resources,
the names of a deployment's actors, and its record in Ray's internal KV store (the GCS)."""
from __future__ import annotations

import json
import math

import ray

NAMESPACE = "kafray"
# An actor that cannot be placed waits forever in Ray; we wait this long, then say why.
READY_TIMEOUT_S = 120.0


class ClusterTooSmall(RuntimeError):
    """The cluster lacks the resources asked for (Ray would wait for them without a word)."""


class DeploymentFailed(RuntimeError):
    """The deployment's workers could not start, or stopped on an error; the message says why."""


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


def check_kafka_for_ray(config: dict) -> None:
    """Each actor joins its group as a static member under its own `group.instance.id` (its
    name): one id given to all would have them fence one another out of the group."""
    kafka = dict(config.get("kafka") or {})  # a dict, or (key, value) pairs as the worker takes
    if "group.instance.id" in kafka:
        raise ValueError(f"-X group.instance.id={kafka['group.instance.id']}: on Ray each worker is a static "
                         f"member under its own id (the actor's name); remove it")


def error_kind(e: BaseException) -> str:
    """Whose error an exception is, as the binding's `stats()["error_kind"]` names it (its
    ValueError is the user's, OSError the outside world's, anything else kafray's)."""
    if isinstance(e, ClusterTooSmall):
        return "cluster"
    return "user" if isinstance(e, ValueError) else "external" if isinstance(e, OSError) else "internal"


def death_cause(e: BaseException) -> str:
    """The first lines of why an actor call failed: Ray's death cause names the actor's error."""
    text = f"{type(e).__name__}: {e}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:3])[:500]


def actor_name(deployment: str, index: int) -> str:
    """A worker's actor name, which is also its static group member id."""
    return f"{deployment}-worker-{index:03d}"


def controller_name(deployment: str) -> str:
    return f"{deployment}-controller"


def controller(deployment: str):
    """The deployment's controller actor, or None."""
    try:
        return ray.get_actor(controller_name(deployment))
    except ValueError:
        return None


# ---- the deployment's record in the GCS ----

def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def _key(deployment: str) -> bytes:
    return f"deployment/{deployment}".encode()


def read_record(deployment: str) -> dict | None:
    """The deployment's target state and the actors its controller started, or None."""
    raw = _kv()._internal_kv_get(_key(deployment), namespace=NAMESPACE)
    return json.loads(raw) if raw else None


def write_record(deployment: str, record: dict) -> None:
    _kv()._internal_kv_put(_key(deployment), json.dumps(record).encode(), overwrite=True, namespace=NAMESPACE)


def delete_record(deployment: str) -> None:
    _kv()._internal_kv_del(_key(deployment), namespace=NAMESPACE)


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


def totals(per_worker: list[dict]) -> dict:
    """The deployment's counters from its workers' stats (those that answered)."""
    ok = [s for s in per_worker if "predicted" in s]
    batches = sum(s["batches"] for s in ok)
    lags = [s["lag"] for s in ok if s["lag"] >= 0]
    latency = merged_quantiles([s.get("latency_ms_counts", []) for s in ok], (0.5, 0.99))
    return {
        "workers": len(per_worker),
        "running": sum(1 for s in per_worker if s.get("running")),
        "nodes": len({s["node_id"] for s in ok}),
        "consumed": sum(s["consumed"] for s in ok),
        "predicted": sum(s["predicted"] for s in ok),
        "dead_lettered": sum(s["dead_lettered"] for s in ok),
        "mean_batch": sum(s["batched_frames"] for s in ok) / batches if batches else 0.0,
        "batch_limits": [s["batch_limit"] for s in ok],
        "lag": sum(lags) if lags else None,
        "latency_p50_ms": latency[0],
        "latency_p99_ms": latency[1],
        "restarts": sum(s.get("restarts", 0) for s in ok),
        "failed": {s["actor"]: s["error"] for s in per_worker if s.get("error")},
    }
