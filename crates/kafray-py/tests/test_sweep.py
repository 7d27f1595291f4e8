"""The benchmark suite (bench/): the Python peer is a correct at-least-once consumer, the sweep
measures every cell of both systems and writes its CSVs and charts, and the latency benchmark
measures every paced and bursty cell."""
from __future__ import annotations

import csv

from bench import harness, latency, peer, sweep
from conftest import evaluate, produce_mnist, wait_for


def test_peer_predicts_every_frame_dead_letters_bad_ones_and_commits_after_delivery(ray_cluster, broker):
    import kafray
    import ray
    from confluent_kafka import Consumer, Producer, TopicPartition

    total = 3000
    harness.create_topics(broker, [("frames", 4), ("predictions", 4), ("frames.dlq", 1)])
    model = kafray.find_model("mnist")
    actors = [peer.PeerWorker.options(num_cpus=1).remote(model) for _ in range(2)]
    try:
        ray.get([a.start.remote(broker, "frames", "predictions", "peer-test", 16) for a in actors], timeout=120)
        wait_for(lambda: all(s.get("assigned_partitions") for s in ray.get([a.stats.remote() for a in actors])),
                 60, "both peer workers to own partitions", interval=0.1)
        assert produce_mnist(broker, total, partitions=4).wait(120) == 0
        bad = Producer({"bootstrap.servers": broker})
        bad.produce("frames", value=b"not an image", key=b"cam-x")
        bad.produce("frames", value=b"\x01\x02\x03", key=b"cam-y",
                    headers=[("kafray.format", b"raw"), ("kafray.shape", b"28x28x1")])
        assert bad.flush(30) == 0

        def finished():
            s = ray.get([a.stats.remote() for a in actors])
            assert not any(x["error"] for x in s), s
            return sum(x["predicted"] + x["dead_lettered"] for x in s) >= total + 2 and s

        stats = wait_for(finished, 120, "the peer to handle every frame", interval=0.1)
        final = ray.get([a.stop.remote() for a in actors], timeout=120)
    finally:
        for a in actors:
            ray.kill(a)
    assert sum(x["dead_lettered"] for x in final) == 2
    # The harness reads both systems' stats alike: what the peer reports bears kafray's names
    # (the schema of kafray::metrics::WorkerStats), besides what only a Python process has.
    kafray_names = set(kafray.Worker(brokers=broker, metrics_addr="").stats())
    peer_only = {"pid", "store_failures", "last_store_failure"}
    assert set(final[0]) - peer_only <= kafray_names, set(final[0]) - peer_only - kafray_names
    assert all(x["predicted"] > 0 and x["stages_us"]["infer"] > 0 for x in stats), "both workers classified"
    report = evaluate(broker, total)
    assert report["distinct_frames"] == total and report["duplicates"] == 0, report
    assert report["accuracy"] >= 0.985, report

    reader = Consumer({"bootstrap.servers": broker, "group.id": "peer-test-check", "enable.auto.commit": False})
    reasons = []
    reader.assign([TopicPartition("frames.dlq", 0, 0)])
    while len(reasons) < 2:
        m = reader.poll(10)
        assert m is not None, "dead letters missing"
        reasons.append(dict(m.headers())["kafray.error"].decode())
    assert any("undecodable frame" in r for r in reasons), reasons
    assert any("cannot reshape" in r or "shape" in r for r in reasons), reasons
    # Committed offsets reach the end of every partition: nothing is read again, nothing lost.
    group = Consumer({"bootstrap.servers": broker, "group.id": "peer-test"})
    parts = [TopicPartition("frames", p) for p in range(4)]
    committed = group.committed(parts, timeout=10)
    ends = [reader.get_watermark_offsets(tp, timeout=10)[1] for tp in parts]
    assert [c.offset for c in committed] == ends, [(x["worker_id"], x.get("store_failures"), x["last_store_failure"], x["error"]) for x in final]
    reader.close()
    group.close()


def test_sweep_measures_both_systems_against_the_raw_limit(ray_cluster, tmp_path):
    out = tmp_path / "sweep"
    code = sweep.main(["--workers", "1,2", "--batches", "5", "--models", "mnist", "--frames", "1500",
                       "--raw-seconds", "0.3", "--address", ray_cluster, "--out", str(out)])
    assert code == 0
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["system"], r["workers"]) for r in rows) == [("kafray", "1"), ("kafray", "2"),
                                                               ("peer", "1"), ("peer", "2")]
    for r in rows:
        assert int(r["distinct"]) == 1500 and int(r["duplicates"]) == 0, r
        assert float(r["accuracy"]) >= 0.98, r
        assert int(r["workers_with_results"]) == int(r["workers"]), r
        assert 0 < float(r["mean_batch"]) <= 5, r
        assert float(r["images_per_s"]) > 0 and 0 < float(r["of_raw"]), r
        assert float(r["infer_ms_per_image"]) > 0 and float(r["worker_cpu_cores"]) > 0, r
        assert r["latency_ms_p50"] != "" and int(r["latency_ms_p99"]) >= int(r["latency_ms_p50"]), r
        if r["system"] == "kafray":
            assert float(r["kafray_over_peer"]) > 0, r
    with open(out / "raw.csv", newline="") as f:
        raw = list(csv.DictReader(f))
    assert {r["parallel"] for r in raw} >= {"1"} and all(float(r["images_per_s"]) > 0 for r in raw)
    for chart in ("fig9_mnist.png", "ratios.png"):
        data = (out / chart).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, chart
    # The charts can be redrawn from the CSVs alone.
    (out / "ratios.png").unlink()
    assert sweep.main(["--plot-only", "--out", str(out)]) == 0
    assert (out / "ratios.png").is_file()


def test_latency_measures_every_cell_and_every_frame_is_predicted_once(ray_cluster, tmp_path):
    out = tmp_path / "latency"
    code = latency.main(["--models", "mnist", "--systems", "kafray", "--seconds", "1", "--burst-cycles", "1",
                         "--address", ray_cluster, "--out", str(out)])
    assert code == 0
    with open(out / "cells.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["kind"], r["load"]) for r in rows] == [("saturation", "1.0"), *(("paced", str(x)) for x in latency.LOADS),
                                                      ("bursty", "1.5")]
    for r in rows:
        # Every frame predicted; a duplicate only for what was in flight when a worker started
        # again (Tansu can answer an idempotent producer out of sequence, a fatal producer error).
        assert int(r["distinct"]) == int(r["frames"]), r
        assert int(r["duplicates"]) <= int(r["restarts"]) * int(r["max_in_flight"]), r
        assert float(r["accuracy"]) >= 0.98, r
        assert 0 < float(r["latency_ms_p50"]) <= float(r["latency_ms_p99"]) <= float(r["latency_ms_max"]), r
        assert float(r["infer_ms"]) > 0 and float(r["fetch_ms"]) >= 0, r
    paced = [r for r in rows if r["kind"] == "paced"]
    assert [float(r["offered_per_s"]) for r in paced] == sorted(float(r["offered_per_s"]) for r in paced)
    for chart in ("latency_mnist.png", "bursty_mnist.png"):
        data = (out / chart).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, chart
