"""A live worker's Prometheus endpoint, read with a real OpenMetrics parser."""
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from conftest import KAFRAY_BIN, REPO, evaluate, produce_mnist, wait_for


def scrape(url: str) -> dict:
    """{sample name: [(labels, value)]} of one scrape."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(samples: dict, name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


def start_worker(broker: str, worker_id: str) -> tuple[subprocess.Popen, str]:
    """A `kafray worker` serving metrics on a free loopback port; returns it and its URL."""
    worker = subprocess.Popen([str(KAFRAY_BIN), "worker", "-b", broker, "--create-topics", "4", "--worker-id",
                               worker_id, "--metrics-addr", "127.0.0.1:0", "--status-interval", "1"],
                              cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []

    def read():
        for line in worker.stderr:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    url = wait_for(lambda: next((m.group(1) for ln in lines if (m := re.search(r"metrics at (http://\S+)", ln))),
                                None), 60, "the worker to say where its metrics are")
    return worker, url


def test_a_worker_serves_prometheus_metrics_that_agree_with_eval(broker):
    assert produce_mnist(broker, 2000).wait(120) == 0
    worker, url = start_worker(broker, "w-prom")
    try:
        report = evaluate(broker, 2000)
        # The worker counts an acknowledgement when librdkafka reports it, and the lag when its
        # statistics come (every second): wait for the last prediction and a lag of 0 everywhere.
        def settled():
            s = scrape(url)
            lags = [v for _, v in s.get("kafray_consumer_lag", [])]
            done = total(s, "kafray_frames_predicted_total") == 2000 and len(lags) == 4 and not any(lags)
            return s if done else None

        samples = wait_for(settled, 30, "2000 predictions counted and no lag on any of the 4 partitions")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    assert report["distinct_frames"] == 2000 and report["duplicates"] == 0, report
    assert total(samples, "kafray_frames_consumed_total") == 2000
    assert total(samples, "kafray_frames_dead_lettered_total") == 0
    assert {labels["reason"] for labels, _ in samples["kafray_frames_dead_lettered_total"]} >= {"undecodable",
                                                                                                "model_failed"}
    # Histograms: one latency per prediction, every frame in some batch, stages for each frame.
    assert total(samples, "kafray_latency_seconds_count") == 2000
    assert total(samples, "kafray_batch_size_sum") == 2000
    stages = {labels["stage"]: v for labels, v in samples["kafray_stage_seconds_count"]}
    assert stages == {s: 2000 for s in ("fetch", "decode", "queue", "infer", "ack")}, stages
    # The p99 from the histogram's buckets brackets eval's p99 (the buckets double).
    buckets = sorted((float(labels["le"]), v) for labels, v in samples["kafray_latency_seconds_bucket"])
    p99_bound = next(le for le, count in buckets if count >= 0.99 * 2000)
    assert report["latency_ms_p99"] / 1000 <= p99_bound, (report["latency_ms_p99"], buckets)
    assert total(samples, "kafray_assigned_partitions") == 4
    assert sorted(labels["partition"] for labels, _ in samples["kafray_consumer_lag"]) == ["0", "1", "2", "3"]
    assert all(labels["worker"] == "w-prom" for labels, _ in samples["kafray_frames_predicted_total"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_prometheus_server_scrapes_a_worker_and_answers_rate_and_p99(broker, tmp_path):
    """Debian's prometheus (scripts/setup.sh installs it) scrapes a running worker; its query API
    gives the predicted count, the rate and the p99 computed from the latency histogram."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is missing: run `bash scripts/setup.sh` (it installs Debian's package)")
    worker, url = start_worker(broker, "w-scraped")
    target = urllib.parse.urlparse(url).netloc
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: kafray\n    static_configs:\n      - targets: ['{target}']\n")
    web = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address={web}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(q: str) -> list:
        body = urllib.request.urlopen(f"http://{web}/api/v1/query?" + urllib.parse.urlencode({"query": q}),
                                      timeout=10).read()
        return json.loads(body)["data"]["result"]

    def value(q: str) -> float | None:
        result = query(q)
        return float(result[0]["value"][1]) if result else None

    def ready() -> bool:
        try:
            return urllib.request.urlopen(f"http://{web}/-/ready", timeout=5).status == 200
        except OSError:  # not listening yet
            return False

    try:
        wait_for(ready, 60, "Prometheus to start")
        wait_for(lambda: value('up{job="kafray"}') == 1, 60, "Prometheus to scrape the worker")
        assert produce_mnist(broker, 3000, rate=500).wait(120) == 0
        report = evaluate(broker, 3000)
        wait_for(lambda: value("sum(kafray_frames_predicted_total)") == 3000, 60,
                 "Prometheus to see all 3000 predictions")
        rate = value("sum(rate(kafray_frames_predicted_total[1m]))")
        p99 = value("histogram_quantile(0.99, sum by (le) (rate(kafray_latency_seconds_bucket[1m])))")
        buckets = sorted((float(labels["le"]), v) for labels, v in scrape(url)["kafray_latency_seconds_bucket"])
    finally:
        server.terminate()
        server.wait(30)
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    assert report["distinct_frames"] == 3000, report
    assert rate is not None and rate > 0, rate
    # Prometheus' estimate lies in the bucket where the worker's own counts cross 99 % (it
    # interpolates inside it). The histogram times the broker's acknowledgement, so it runs a
    # little later than eval's prediction timestamps: eval's p99 is at most the bucket's top.
    total_count = buckets[-1][1]
    upper = next(le for le, count in buckets if count >= 0.99 * total_count)
    lower = max((le for le, count in buckets if le < upper), default=0.0)
    assert p99 is not None and lower <= p99 <= upper, (p99, lower, upper)
    assert report["latency_ms_p99"] / 1000 <= upper, (report["latency_ms_p99"], upper)


def dashboard_builder():
    """deploy/grafana/dashboard.py as a module: its queries() and render()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dashboard", REPO / "deploy" / "grafana" / "dashboard.py")
    dashboard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dashboard)
    return dashboard


def start_prometheus(config: str, tmp_path) -> tuple[subprocess.Popen, str]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is missing: run `bash scripts/setup.sh` (it installs Debian's package)")
    (tmp_path / "prometheus.yml").write_text(config)
    web = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address={web}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ready() -> bool:
        try:
            return urllib.request.urlopen(f"http://{web}/-/ready", timeout=5).status == 200
        except OSError:  # not listening yet
            return False

    wait_for(ready, 60, "Prometheus to start")
    return server, web


def api(web: str, q: str) -> dict:
    """The query API's whole answer (status, and data or error)."""
    try:
        body = urllib.request.urlopen(f"http://{web}/api/v1/query?" + urllib.parse.urlencode({"query": q}),
                                      timeout=10).read()
    except urllib.error.HTTPError as e:  # a bad query: the body says why
        body = e.read()
    return json.loads(body)


def test_prometheus_finds_a_ray_deployment_through_its_service_discovery_and_the_dashboard_queries_run(
        ray_cluster, broker, deployments, tmp_path):
    """The shipped Prometheus config (deploy/prometheus) finds every actor of a Ray deployment
    through the file its controller writes; cluster-wide numbers come from summed histograms; and
    every query of the shipped Grafana dashboard runs on that data."""
    from kafray import ray as kray

    dashboard = dashboard_builder()
    config = (REPO / "deploy" / "prometheus" / "prometheus.yml").read_text().replace("scrape_interval: 5s",
                                                                                     "scrape_interval: 1s")
    d = kray.Deployment.start(2, name=f"prom-{len(deployments)}", address=ray_cluster, brokers=broker,
                              create_topics=4, status_interval_s=1)
    deployments.append(d)
    server, web = start_prometheus(config, tmp_path)

    def value(q: str) -> float | None:
        result = api(web, q)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    try:
        wait_for(lambda: value(f'count(up{{job="kafray",kafray_deployment="{d.name}"}} == 1)') == 3, 90,
                 "Prometheus to find the 2 workers and the controller")
        assert produce_mnist(broker, 3000, rate=600).wait(120) == 0
        report = evaluate(broker, 3000)
        wait_for(lambda: value("sum(kafray_frames_predicted_total)") == 3000, 60, "all 3000 predictions in Prometheus")
        answers = {q: api(web, q) for q in dashboard.queries()}
        workers = value('count(kafray_assigned_partitions > 0)')
        stats = d.stats()
        p99 = value(dashboard.STATS[1][2])
    finally:
        server.terminate()
        server.wait(30)
    assert report["distinct_frames"] == 3000, report
    assert workers == 2, workers
    failed = {q: a.get("error") for q, a in answers.items() if a["status"] != "success"}
    assert not failed, failed
    empty = [q for q, a in answers.items() if not a["data"]["result"]]
    # The autoscaler's series exist only with --autoscale; everything else has data.
    assert all("autoscale" in q for q in empty), empty
    # Prometheus' p99 of the merged buckets, and stats()'s of the merged histograms, agree to the
    # bucket (Prometheus interpolates inside a bucket that doubles).
    assert p99 is not None and stats["latency_p99_ms"] > 0, (p99, stats)
    assert p99 / 2 <= stats["latency_p99_ms"] / 1000 <= p99 * 2, (p99, stats["latency_p99_ms"])


def test_the_grafana_dashboard_is_current_and_valid_for_grafanas_dashboard_model():
    """deploy/grafana/kafray.json is what dashboard.py builds, and Grafana's dashboard model
    (grafana-foundation-sdk) reads it back whole: every panel, query and the datasource variable."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    dashboard = dashboard_builder()
    shipped = (REPO / "deploy" / "grafana" / "kafray.json").read_text()
    assert shipped == dashboard.render(), "kafray.json is stale: run .venv/bin/python deploy/grafana/dashboard.py"
    data = json.loads(shipped)
    model = Dashboard.from_json(data)
    assert json.loads(json.dumps(model, cls=JSONEncoder)) == data, "Grafana's model does not read it back whole"
    titles = {p["title"] for p in data["panels"]}
    assert {"Throughput", "Latency, produce to acknowledged prediction", "Consumer lag (frames behind the log end)",
            "Workers", "Batch size", "Dead letters by reason"} <= titles, titles
    exprs = [t["expr"] for p in data["panels"] for t in p["targets"]]
    assert sorted(exprs) == sorted(dashboard.queries())
    assert all(p["datasource"]["uid"] == "${datasource}" for p in data["panels"])
