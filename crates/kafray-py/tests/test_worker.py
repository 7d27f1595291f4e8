"""The Python Worker and Classifier, without Ray."""
import subprocess
import sys

import pytest

import kafray
from conftest import KAFRAY_BIN, REPO, evaluate, kafray_cli, probe as _probe, produce_mnist


def test_unknown_config_field_and_bad_model_name_the_problem():
    with pytest.raises(ValueError, match="unknown field `batchsize`"):
        kafray.Worker(batchsize=10)
    with pytest.raises(ValueError, match="KAFRAY_MODELS"):
        kafray.Worker(model="no_such_model").start()


def test_worker_predicts_a_stream_and_stops_cleanly(broker):
    producer = produce_mnist(broker, 2000)
    assert producer.wait(120) == 0
    worker = kafray.Worker(brokers=broker, input_topic="frames", group="py", batch_size=20,
                           create_topics=4).start()
    try:
        report = evaluate(broker, 2000)
    finally:
        final = worker.stop(timeout=60)
    assert report["distinct_frames"] == 2000 and report["accuracy"] >= 0.98, report
    assert final["predicted"] == 2000 and final["error"] is None and not final["running"], final
    assert final["mean_batch"] > 1, final
    assert not worker.running


def test_device_auto_falls_back_to_the_cpu_where_cuda_is_missing_and_cuda_says_why(broker):
    """This machine's ONNX Runtime has no CUDA: `auto` runs on the CPU (and says so in stats),
    `cuda` fails at start with the fix."""
    with pytest.raises(ValueError, match="no CUDA execution provider.*onnxruntime-gpu"):
        kafray.Worker(brokers=broker, device="cuda", create_topics=2).start()
    assert produce_mnist(broker, 200, partitions=2).wait(120) == 0
    worker = kafray.Worker(brokers=broker, device="auto", group="auto", create_topics=2).start()
    try:
        report = evaluate(broker, 200)
    finally:
        final = worker.stop(timeout=60)
    assert final["device"] == "cpu" and final["predicted"] == 200, final
    assert report["distinct_frames"] == 200, report


def test_classifier_reads_shards_and_images(tmp_path):
    mnist = REPO / "assets" / "mnist"
    paths = kafray.write_mnist_shards(str(mnist / "t10k-images-idx3-ubyte.gz"),
                                      str(mnist / "t10k-labels-idx1-ubyte.gz"), str(tmp_path), 3, 7)
    c = kafray.Classifier("mnist", batch_size=4)
    results = [c.classify_file(p) for p in paths]
    assert [r["images"] for r in results] == [7, 7, 7]
    assert results[0]["classes"][:3] == [7, 2, 1]  # the first test digits
    assert sum(r["correct"] for r in results) >= 20
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="labels-idx1-ubyte"):
        c.classify_file(str(bad))


def test_stats_while_start_loads_the_model_does_not_deadlock(broker):
    """`start` loads the model without the GIL; a thread calling `stats()` meanwhile holds the GIL.
    Were the worker's lock held across the load, each would wait for the other forever. Run in a
    child process, so a deadlock fails the test at its timeout instead of hanging the suite."""
    code = f"""
import threading, kafray
w = kafray.Worker(brokers={broker!r}, group="dl", model="mobilenet_v2", create_topics=1)
t = threading.Thread(target=w.start)
t.start()
polls = 0
while t.is_alive():
    w.stats()
    polls += 1
t.join()
w.stop(timeout=60)
del w  # Drop joins the (already stopped) thread without the GIL
print("polls", polls)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    polls = int(out.stdout.split()[-1])
    assert polls > 0, "stats() ran while the model loaded"


def test_every_worker_setting_is_offered_by_kafray_ray_up_and_documented():
    """The worker's configuration is defined once (Rust's WorkerConfig); the Python surfaces
    must offer every field of it: a field added there without a flag here fails this test."""
    from kafray.ray import cli

    up = cli.parser()._subparsers._group_actions[0].choices["up"]
    flags = {a.dest: a for a in up._actions}
    assert not [f for f in kafray.WORKER_CONFIG_FIELDS if f not in flags], sorted(flags)
    # Their help is the engine's (WorkerConfig's doc comments), not a copy typed again here.
    assert sorted(kafray.WORKER_CONFIG_DOCS) == sorted(kafray.WORKER_CONFIG_FIELDS)
    for field, doc in kafray.WORKER_CONFIG_DOCS.items():
        assert flags[field].help.startswith(doc["summary"].replace("%", "%%")), (field, flags[field].help)
        assert f"``{field}`` (default: {doc['default']})" in " ".join(kafray.Worker.__doc__.split()), field
    assert "[default: 1000]" in flags["max_in_flight"].help
    assert "[default: --name]" in flags["group"].help, "a deployment's own default is said"
    with pytest.raises(ValueError, match="unknown field `batchsize`"):
        kafray.Worker(batchsize=10)


def test_probes_follow_the_worker_from_start_through_a_stall_to_its_stop():
    """/readyz is 503 while the worker starts and 200 once it is a member; a broker frozen mid-stream
    (SIGSTOP) stalls every partition, which the watchdog reports: /healthz turns 503 and names them,
    and turns 200 again once the broker is back. Nothing is lost on the way."""
    import os
    import signal

    from conftest import wait_for

    broker = kafray.EmbeddedBroker("memory")
    try:
        b = broker.bootstrap
        worker = kafray.Worker(brokers=b, group="probes", create_topics=4, metrics_addr="127.0.0.1:0",
                               stall_after_s=2, status_interval_s=1)
        os.kill(broker.pid, signal.SIGSTOP)  # the worker cannot reach its group yet
        try:
            worker.start()
            endpoint = wait_for(lambda: worker.stats()["metrics_endpoint"], 10, "the metrics endpoint")
            status, body = _probe(endpoint, "/readyz")
            assert (status, body["state"]) == (503, "starting"), body
            assert _probe(endpoint, "/healthz")[0] == 200, "starting is alive"
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        wait_for(lambda: _probe(endpoint, "/readyz")[0] == 200, 60, "/readyz 200 once the worker joined")
        producer = produce_mnist(b, 3000, rate=200)
        wait_for(lambda: worker.stats()["predicted"] >= 300, 60, "predictions flowing")
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            status, body = wait_for(lambda: (r := _probe(endpoint, "/healthz"))[0] == 503 and r, 30,
                                    "/healthz 503 for stalled partitions")
            assert body["state"] == "degraded" and body["stalled_partitions"], body
            assert "stalled" in body["reason"], body
            stats = worker.stats()
            assert stats["state"] == "degraded" and stats["partition_stalls"] >= 1, stats
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        wait_for(lambda: _probe(endpoint, "/healthz")[0] == 200, 60, "/healthz 200 once the partitions flow again")
        assert producer.wait(120) == 0
        report = evaluate(b, 3000)
        final = worker.stop(timeout=60)
        assert report["distinct_frames"] == 3000, report
        assert final["state"] == "stopped", final
        assert final["joined"] is False, "a worker that left its group is no member (it stayed one)"
        status, body = _probe(endpoint, "/readyz")
        assert (status, body["state"]) == (503, "stopped"), body
    finally:
        broker.stop()


def test_ctrl_c_interrupts_a_stop_that_cannot_finish():
    """With the broker frozen mid-stream, the drain waits for acknowledgements that cannot come;
    stop() must still answer Ctrl-C promptly (it used to wait, deaf to signals, for the drain's
    30 s bound)."""
    code = f"""
import os, signal, subprocess, threading, time, kafray
broker = kafray.EmbeddedBroker("memory")
b = broker.bootstrap
producer = subprocess.Popen([{str(KAFRAY_BIN)!r}, "produce", "mnist", "-b", b, "--limit", "5000", "--rate", "500",
                             "--partitions", "1", "-q"], cwd={str(REPO)!r})
w = kafray.Worker(brokers=b, group="ctrl-c", create_topics=1, metrics_addr="")
w.start()
while w.stats()["predicted"] < 100:
    time.sleep(0.1)
os.kill(broker.pid, signal.SIGSTOP)  # predictions now wait for acknowledgements that cannot come
sent = []
try:
    threading.Timer(1.0, lambda: (sent.append(time.monotonic()), os.kill(os.getpid(), signal.SIGINT))).start()
    w.stop()
    print("finished", flush=True)
except KeyboardInterrupt:
    print("interrupted", time.monotonic() - sent[0], flush=True)
finally:
    os.kill(broker.pid, signal.SIGCONT)
    producer.kill()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    words = out.stdout.split()
    assert words and words[0] == "interrupted", out
    assert float(words[1]) < 5, f"stop() answered Ctrl-C only after {words[1]} s"


def test_frames_compressed_with_every_codec_a_producer_may_use_are_predicted_and_predictions_can_use_each(broker):
    """An ordinary producer (confluent-kafka, librdkafka built with every codec) compresses its
    batches with each of Kafka's five codecs. A worker whose librdkafka lacked one (zstd) logged a
    decompression error on every fetch and predicted nothing of those frames, for ever. The
    workers' own producers compress their predictions with each codec too."""
    from confluent_kafka import Producer

    from conftest import wait_for

    codecs = ["none", "gzip", "snappy", "lz4", "zstd"]
    headers = [("kafray.format", b"raw"), ("kafray.shape", b"28x28x1")]
    workers = [kafray.Worker(brokers=broker, group=f"codec-{codec}", output_topic=f"predictions-{codec}",
                             create_topics=1, metrics_addr="", kafka={"compression.type": codec}).start()
               for codec in codecs]
    try:
        wait_for(lambda: all(w.stats()["joined"] for w in workers), 60, "the workers to join their groups")
        for codec in codecs:
            producer = Producer({"bootstrap.servers": broker, "compression.type": codec, "linger.ms": 50})
            for i in range(20):
                producer.produce("frames", key=f"{codec}-{i}", value=bytes([i * 12 % 256]) * 784, headers=headers)
            assert producer.flush(30) == 0, codec
        reports = {codec: evaluate(broker, 20 * len(codecs), timeout=60, topic=f"predictions-{codec}")
                   for codec in codecs}
    finally:
        finals = [w.stop(timeout=60) for w in workers]
    for codec, report in reports.items():
        assert report["distinct_frames"] == 100, (codec, report)
    assert all(f["predicted"] == 100 and f["dead_lettered"] == 0 for f in finals), finals


def test_a_batch_the_worker_cannot_decompress_stops_it_loudly_rather_than_stalling_quietly(broker):
    """Tansu serves back an LZ4 batch with bytes after its end mark, which librdkafka cannot
    decompress: it fetches it again every half second for ever and delivers nothing behind it.
    A worker that only logged the error stalled on that partition without end."""
    from rawkafka import LZ4, produce_raw_batch

    assert produce_mnist(broker, 10, partitions=1).wait(60) == 0
    produce_raw_batch(broker, "frames", 0, [b"x" * 784] * 3, codec=LZ4, corrupt="trailing")
    out = kafray_cli("worker", "--brokers", broker, "--create-topics", "1", "--metrics-addr", "", timeout=90)
    assert out.returncode == 1, out.stderr[-3000:]
    said = out.stderr
    assert "cannot read a batch of the input topic" in said, said[-3000:]
    assert "codec this build cannot decode" in said and "--reset-offsets" in said, said[-3000:]


def test_a_static_member_that_stops_leaves_the_group_so_its_partitions_move_before_its_session_ends(broker):
    """KIP-345: a static member (group.instance.id, as every worker on Ray) that closes stays in
    the group until its session times out, and its partitions wait unread. A worker that stops
    leaves: the survivor owns every partition long before this 45 s session could end."""
    from conftest import wait_for

    def static(member: str):
        return kafray.Worker(brokers=broker, group="static", create_topics=4, worker_id=member, metrics_addr="",
                             kafka={"group.instance.id": member, "session.timeout.ms": "45000"}).start()

    survivor, leaving = static("a"), static("b")
    try:
        wait_for(lambda: survivor.stats()["assigned_partitions"] and leaving.stats()["assigned_partitions"], 60,
                 "both members to own partitions")
        leaving.stop(timeout=60)
        wait_for(lambda: survivor.stats()["assigned_partitions"] == 4, 20,
                 "the survivor to own all 4 partitions (the leaver's session would last 45 s)")
    finally:
        survivor.stop(timeout=60)
