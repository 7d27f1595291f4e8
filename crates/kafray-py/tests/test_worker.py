"""The Python Worker and Classifier, without Ray."""
import pytest

import kafray
from conftest import REPO, evaluate, produce_mnist


def test_unknown_config_field_and_bad_model_name_the_problem():
    with pytest.raises(ValueError, match="unknown field `batchsize`"):
        kafray.Worker(batchsize=10)
    with pytest.raises(ValueError, match="KAFRAY_MODELS"):
        kafray.Worker(model="no_such_model").start()


def test_worker_predicts_a_stream_and_stops_cleanly(broker):
    producer = produce_mnist(broker, 2000)
    assert producer.wait(120) == 0
    worker = kafray.Worker(brokers=broker, input_topic="frames", group="py", batch_size=20,
                           kafka={"session.timeout.ms": "10000"}).start()
    try:
        report = evaluate(broker, 2000)
    finally:
        final = worker.stop(timeout=60)
    assert report["distinct_frames"] == 2000 and report["accuracy"] >= 0.98, report
    assert final["predicted"] == 2000 and final["error"] is None and not final["running"], final
    assert final["mean_batch"] > 1, final
    assert not worker.running


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
