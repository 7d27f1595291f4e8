"""kafray on a Ray cluster: workers as Ray actors, owned by one controller per deployment.

Library::

    from kafray.ray import Deployment
    d = Deployment.start(workers=4, brokers="kafka:9092", model="mnist", batch_size=20)
    d.stats(); d.scale(8); d.update(model="models/mnist_v2.onnx"); d.stop()

CLI: ``kafray-ray`` (:mod:`kafray.ray.cli`).

Rooms, in the order a request goes through them:

- :mod:`kafray.ray.handle`: :class:`Deployment`, the thin client: it sets the target and waits;
- :mod:`kafray.ray.controller`: the deployment's one owner: it keeps the target in Ray's KV store
  and reconciles the workers to it every turn (start, stop, replace, roll, autoscale);
- :mod:`kafray.ray.actor`: the worker actor, a :class:`kafray.Worker` (Rust, GIL released);
- :mod:`kafray.ray.cluster`: what they share (connection, resources, names, the KV record).

Each actor is a static member of the consumer group, so one that Ray restarts after its process
died takes its partitions back without a rebalance; one the controller retires leaves the group,
so its partitions move at once. Offsets are committed only after results are acknowledged, so a
crash re-delivers what was in flight and loses nothing.
"""
from kafray.ray.actor import MAX_RESTARTS, KafrayWorkerActor
from kafray.ray.cluster import (NAMESPACE, READY_TIMEOUT_S, ClusterTooSmall, DeploymentFailed, check_kafka_for_ray,
                                cluster_nodes, connect, merged_quantiles)
from kafray.ray.handle import Deployment

__all__ = ["Deployment", "ClusterTooSmall", "DeploymentFailed", "KafrayWorkerActor", "NAMESPACE", "MAX_RESTARTS",
           "READY_TIMEOUT_S", "check_kafka_for_ray", "cluster_nodes", "connect", "merged_quantiles", "main"]


def main(argv: list[str] | None = None) -> int:
    """`kafray-ray`: see :mod:`kafray.ray.cli`."""
    from kafray.ray import cli

    return cli.main(argv)
