"""The peer baseline: the paper's design as a Python user would write it today.

Each Ray actor runs one `confluent-kafka` consumer in the group, pulls micro-batches with
``consume(num_messages=batch_size)``, decodes with PIL/numpy, runs the same ONNX model in Python
onnxruntime (same intra-op threads as kafray), and produces JSON results with an idempotent
producer. Offsets follow rust-rdkafka's at-least-once recipe, as kafray's do: auto-commit on,
automatic offset *store* off, and a batch's offsets are stored only once every one of its results
is acknowledged (in batch order, so a commit never passes an unacknowledged frame). Frames that
fail to decode go to the dead-letter topic with the reason. Results use kafray's prediction
format, so one evaluator reads both systems.

It keeps the same counters as kafray's worker, stage times included, so the sweep can compare
where each spends its time. Stages: poll (inside ``consume``), decode (PIL/numpy, batch
normalisation), infer (``session.run`` and top-k), produce (JSON and ``produce`` calls).
"""
from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections import deque

import numpy as np
import ray
from PIL import Image

# Preprocessing of the models in ../shared/assets (see its README): MNIST takes raw 0..255 pixels,
# MobileNetV2 x/255 then ImageNet mean/std, both NCHW.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255.0
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Batch:
    """Frames of one micro-batch whose results are not all acknowledged yet."""

    __slots__ = ("pending", "offsets")

    def __init__(self):
        self.pending = 0
        self.offsets: dict[int, int] = {}  # partition -> next offset to commit


@ray.remote(max_restarts=0)
class PeerWorker:
    """One consumer-group member. The model loads once per actor; `start`/`stop` run one stream
    (new consumer and producer each time), so a sweep can reuse the actor across batch sizes."""

    def __init__(self, model_path: str, labels_path: str | None = None, threads: int = 1, top_k: int = 5):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        _, channels, self.height, self.width = inp.shape
        self.rgb = channels == 3
        self.model_name = os.path.splitext(os.path.basename(model_path))[0]
        self.labels = None
        if labels_path:
            with open(labels_path) as f:
                self.labels = [line.strip() for line in f if line.strip()]
        self.top_k = top_k
        self.worker_id = f"peer-{socket.gethostname()}-{os.getpid()}"
        self._thread: threading.Thread | None = None

    def ready(self) -> dict:
        return {"pid": os.getpid(), "worker_id": self.worker_id,
                "node_id": ray.get_runtime_context().get_node_id()}

    def start(self, brokers: str, input_topic: str, output_topic: str, group: str, batch_size: int,
              max_wait_ms: int = 20, max_in_flight: int = 1000) -> None:
        from confluent_kafka import Consumer, Producer

        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("already running: stop first")
        self.batch_size = batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_in_flight = max_in_flight
        self.input_topic = input_topic
        self.output_topic = output_topic
        self.dead_letter_topic = f"{input_topic}.dlq"
        self.assigned = 0
        self.consumer = Consumer({
            "bootstrap.servers": brokers,
            "group.id": group,
            "enable.auto.commit": True,
            "auto.commit.interval.ms": 1000,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # Same as kafray (see its source/mod.rs): no frame waits long for a held fetch.
            "fetch.wait.max.ms": 5,
        })
        self.producer = Producer({
            "bootstrap.servers": brokers,
            "enable.idempotence": True,
            "linger.ms": 5,
            "queue.buffering.max.messages": 200000,
        })
        self.batches: deque[_Batch] = deque()
        self.in_flight = 0
        self.counters = dict(consumed=0, predicted=0, dead_lettered=0, batches=0, batched_frames=0,
                             delivery_failures=0, consume_errors=0)
        self.stages = dict(poll=0.0, decode=0.0, infer=0.0, produce=0.0)
        self.error: str | None = None
        self._stop = threading.Event()

        def on_assign(consumer, partitions):
            self.assigned = len(partitions)

        def on_revoke(consumer, partitions):
            # Results of frames already taken still get stored as they are acknowledged;
            # a frame re-read by the partition's next owner is a duplicate, never a loss.
            self.producer.flush(30)
            self._store_done()
            self.assigned = 0

        self.consumer.subscribe([self.input_topic], on_assign=on_assign, on_revoke=on_revoke)
        self._thread = threading.Thread(target=self._run, name="peer-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._step()
            self.producer.flush(30)
            self._store_done()
            self._commit()
        except Exception as e:  # noqa: BLE001 - reported through stats()
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.consumer.close()

    def _commit(self) -> None:
        from confluent_kafka import KafkaError, KafkaException

        try:
            self.consumer.commit(asynchronous=False)
        except KafkaException as e:
            if e.args[0].code() != KafkaError._NO_OFFSET:  # nothing stored since the last commit
                raise

    def _step(self) -> None:
        # Backpressure: no more than max_in_flight unacknowledged results.
        while self.in_flight >= self.max_in_flight and not self._stop.is_set():
            self.producer.poll(0.01)
            self._store_done()
        t0 = time.perf_counter()
        msgs = self.consumer.consume(num_messages=self.batch_size, timeout=self.max_wait)
        t1 = time.perf_counter()
        self.stages["poll"] += t1 - t0
        self.producer.poll(0)
        self._store_done()
        if not msgs:
            return
        # One record per consume() call: its offsets are stored once every result and dead
        # letter of it is acknowledged, never before an earlier frame's.
        batch = _Batch()
        self.batches.append(batch)
        frames, images = [], []
        for m in msgs:
            if m.error():
                self.counters["consume_errors"] += 1
                continue
            self.counters["consumed"] += 1
            batch.offsets[m.partition()] = max(batch.offsets.get(m.partition(), -1), m.offset() + 1)
            try:
                images.append(self._decode(m))
                frames.append(m)
            except Exception as e:  # noqa: BLE001 - the frame's fault: park it with the reason
                self._dead_letter(m, f"undecodable frame: {e}", batch)
        if not frames:
            return
        tensor = self._normalise(images)
        t2 = time.perf_counter()
        self.stages["decode"] += t2 - t1
        logits = self.session.run(None, {self.input_name: tensor})[0]
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(self.top_k, probs.shape[1])
        top = np.argsort(-probs, axis=1)[:, :k]
        t3 = time.perf_counter()
        self.stages["infer"] += t3 - t2
        self.counters["batches"] += 1
        self.counters["batched_frames"] += len(frames)
        self._produce(frames, probs, top, batch)
        self.stages["produce"] += time.perf_counter() - t3

    def _decode(self, m) -> np.ndarray:
        headers = dict(m.headers() or [])
        fmt = (headers.get("kafray.format") or b"").decode()
        value = m.value()
        if fmt == "raw":
            h, w, c = (int(x) for x in headers["kafray.shape"].decode().split("x"))
            pixels = np.frombuffer(value, dtype=np.uint8).reshape(h, w, c)
        else:
            img = Image.open(io.BytesIO(value))
            if img.format == "JPEG":
                # A careful Python engineer's shortcut for camera frames: Pillow's draft has libjpeg
                # decode at 1/2, 1/4 or 1/8 of the size where that still covers the input.
                img.draft("RGB" if self.rgb else "L", (self.width, self.height))
            img = img.convert("RGB" if self.rgb else "L")
            if img.size != (self.width, self.height):
                img = img.resize((self.width, self.height), Image.BILINEAR)
            pixels = np.asarray(img).reshape(self.height, self.width, 3 if self.rgb else 1)
        if pixels.shape != (self.height, self.width, 3 if self.rgb else 1):
            raise ValueError(f"shape {pixels.shape} does not match the model input")
        return pixels

    def _normalise(self, images: list) -> np.ndarray:
        x = np.stack(images).astype(np.float32)  # NHWC
        if self.rgb:
            x = (x - MEAN) / STD
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def _produce(self, frames: list, probs: np.ndarray, top: np.ndarray, batch: _Batch) -> None:
        done_ms = _now_ms()
        for i, m in enumerate(frames):
            headers = dict(m.headers() or [])
            classes = top[i].tolist()
            entries = [[c, self.labels[c] if self.labels else None, float(probs[i, c])] for c in classes]
            seq = headers.get("kafray.seq")
            ts_type, ts = m.timestamp()
            key = m.key()
            prediction = {
                "source": key.decode(errors="replace") if key is not None else None,
                "seq": int(seq) if seq else None,
                "partition": m.partition(),
                "offset": m.offset(),
                "class": classes[0],
                "label": entries[0][1],
                "score": entries[0][2],
                "top": entries,
                "model": self.model_name,
                "worker": self.worker_id,
                "batch_size": len(frames),
                "ts_produce_ms": ts if ts_type != 0 else None,
                "ts_done_ms": done_ms,
            }
            truth = headers.get("kafray.label")
            self._send(self.output_topic, key, json.dumps(prediction).encode(),
                       [("kafray.truth", truth)] if truth is not None else None, batch, predicted=True)

    def _dead_letter(self, m, reason: str, batch: _Batch) -> None:
        headers = list(m.headers() or []) + [("kafray.error", reason.encode()),
                                             ("kafray.source.partition", str(m.partition()).encode()),
                                             ("kafray.source.offset", str(m.offset()).encode())]
        self._send(self.dead_letter_topic, m.key(), m.value(), headers, batch, predicted=False)

    def _send(self, topic, key, value, headers, batch: _Batch, predicted: bool) -> None:
        def delivered(err, _msg):
            self.in_flight -= 1
            batch.pending -= 1
            if err is not None:
                self.counters["delivery_failures"] += 1
                self.error = f"delivery failed: {err}"
                self._stop.set()
            elif predicted:
                self.counters["predicted"] += 1
            else:
                self.counters["dead_lettered"] += 1

        batch.pending += 1
        self.in_flight += 1
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=delivered)
                return
            except BufferError:  # the local queue is full: serve callbacks, then retry
                self.producer.poll(0.05)

    def _store_done(self) -> None:
        """Stores the offsets of the fully acknowledged batches at the front, in order."""
        from confluent_kafka import TopicPartition

        while self.batches and self.batches[0].pending == 0:
            done = self.batches.popleft()
            try:
                self.consumer.store_offsets(
                    offsets=[TopicPartition(self.input_topic, p, o) for p, o in done.offsets.items()])
            except Exception as e:  # noqa: BLE001 - a partition revoked meanwhile: its next owner re-reads
                self.counters["store_failures"] = self.counters.get("store_failures", 0) + 1
                self.last_store_failure = f"{e} ({done.offsets})"

    def stats(self) -> dict:
        if self._thread is None:
            return {"worker_id": self.worker_id, "pid": os.getpid(), "running": False}
        s = dict(self.counters)
        s.update(worker_id=self.worker_id, pid=os.getpid(), assigned_partitions=self.assigned,
                 running=self._thread is not None and self._thread.is_alive(), error=self.error,
                 last_store_failure=getattr(self, "last_store_failure", None),
                 stages_us={k: int(v * 1e6) for k, v in self.stages.items()})
        return s

    def stop(self, timeout: float = 60.0) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        return self.stats()
