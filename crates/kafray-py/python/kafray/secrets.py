"""Secrets in a Ray deployment's Kafka configuration (passwords, keys, client secrets).

They never travel in an actor's creation arguments, which Ray keeps in its records and shows in
its state API. The driver splits them from the configuration (`split`) and hands them to the
deployment's controller in a method call; the controller keeps them in memory and in a file
only its user can read, on its host, so that a restarted controller still has them; each worker
asks the controller for them at its start. Which properties are secret is the engine's one
definition (`kafray._native.is_secret_property`). A value that names a secret instead
(`${env:NAME}`, `${file:PATH:KEY}`) is not one: it travels as written and is resolved on the
worker's node.
"""
from __future__ import annotations

import hashlib
import json
import os

from kafray import _native, shipping
from kafray.files import write_file_atomically

def kafka_properties(config: dict) -> list[tuple[str, str]]:
    """The `kafka` setting as (key, value) pairs: a dict, or pairs as the worker takes them."""
    kafka = config.get("kafka") or []
    items = kafka.items() if isinstance(kafka, dict) else kafka
    return [(str(k), str(v)) for k, v in items]


def split(config: dict) -> tuple[dict, dict[str, str]]:
    """(the configuration without secrets, the secret properties). A `kafka_config` file is read
    here, on the driver: its properties join `kafka` (the file first, `kafka` over it, as the
    worker does), and the file need not exist on the nodes."""
    config = dict(config)
    pairs = []
    if config.get("kafka_config"):
        pairs += _native.read_kafka_config(config["kafka_config"])
    config.pop("kafka_config", None)
    pairs += kafka_properties(config)
    merged: dict[str, str] = {}
    for k, v in pairs:  # the last of a key wins, as in librdkafka
        merged.pop(k, None)
        merged[k] = v
    secret = {k: v for k, v in merged.items() if _native.is_secret_property(k) and not _native.is_secret_reference(v)}
    public = [[k, v] for k, v in merged.items() if k not in secret]
    config.pop("kafka", None)
    if public:
        config["kafka"] = public
    return config, secret


def where(deployment: str):
    """The file that keeps a deployment's secrets on this host (named by a digest of the
    deployment's name, which may hold any character)."""
    name = hashlib.sha256(deployment.encode()).hexdigest()[:32]
    return shipping.cache_root() / "secrets" / f"{name}.json"


def _path(deployment: str):
    folder = shipping.private_root(create=True) / "secrets"
    folder.mkdir(mode=0o700, exist_ok=True)
    return where(deployment)


def store(deployment: str, secrets: dict[str, str]) -> None:
    """Keeps the deployment's secrets on this host, readable by this user alone."""
    write_file_atomically(str(_path(deployment)), json.dumps(secrets).encode(), mode=0o600)


def load(deployment: str) -> dict[str, str]:
    try:
        return json.loads(where(deployment).read_text())
    except FileNotFoundError:
        return {}


def remove(deployment: str) -> None:
    try:
        os.remove(where(deployment))
    except FileNotFoundError:
        pass
