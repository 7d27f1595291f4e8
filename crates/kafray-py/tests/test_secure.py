"""kafray against a secured cluster: a real broker (Tansu) that serves TLS only and requires
SASL/SCRAM, as managed Kafka does. Credentials come from a client.properties file or the
environment, and the password shows nowhere: not in process arguments, logs, stats, metrics or
results."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import kafray
from conftest import KAFRAY_BIN, REPO, kafray_cli, wait_for

PASSWORD = "s3cret-Pa55word-for-alice"  # distinctive, so a grep cannot miss it
BOB_PASSWORD = "bob-s3cret-256"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    broker = kafray.EmbeddedBroker("sqlite", users=[("alice", PASSWORD, "SCRAM-SHA-512"),
                                                    ("bob", BOB_PASSWORD, "SCRAM-SHA-256")])
    folder = tmp_path_factory.mktemp("client")
    properties = folder / "client.properties"
    properties.write_text("# as Kafka's client.properties\n"
                          "security.protocol=SASL_SSL\n"
                          "sasl.mechanisms=SCRAM-SHA-512\n"
                          "sasl.username=alice\n"
                          f"sasl.password={PASSWORD}\n"
                          f"ssl.ca.location={broker.ca_location}\n")
    properties.chmod(0o600)
    try:
        yield broker, properties
    finally:
        broker.stop()


def client_config(broker, **extra) -> dict:
    """confluent-kafka's settings for alice: an independent client checks what kafray wrote."""
    return {"bootstrap.servers": broker.bootstrap, "security.protocol": "SASL_SSL", "sasl.mechanisms": "SCRAM-SHA-512",
            "sasl.username": "alice", "sasl.password": PASSWORD, "ssl.ca.location": broker.ca_location, **extra}


def read_all(broker, topic: str, expect: int) -> list:
    """Every record of `topic` (values and headers), read with confluent-kafka over SASL_SSL."""
    from confluent_kafka import Consumer

    consumer = Consumer(client_config(broker, **{"group.id": f"check-{topic}-{time.time()}",
                                                 "auto.offset.reset": "earliest"}))
    consumer.subscribe([topic])
    records, deadline = [], time.monotonic() + 60
    try:
        while len(records) < expect and time.monotonic() < deadline:
            m = consumer.poll(0.5)
            if m is not None and m.error() is None:
                records.append((m.value(), m.headers() or []))
    finally:
        consumer.close()
    return records


def arguments_of(pid: int) -> str:
    """The process's command line as `ps` shows it to every user of the host."""
    return subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True).stdout


def test_cli_and_workers_over_sasl_ssl_predict_every_frame_and_the_password_shows_nowhere(secured, tmp_path):
    broker, properties = secured
    produced = kafray_cli("produce", "mnist", "--brokers", broker.bootstrap, "--kafka-config", str(properties),
                          "--limit", "300", "--partitions", "2", "-q", timeout=120)
    assert produced.returncode == 0, produced.stderr
    # Alice's worker takes the file; Bob's takes SCRAM-SHA-256 through KAFRAY_KAFKA, the
    # environment (readable by its own user only, unlike arguments).
    logs = {name: tmp_path / f"{name}.log" for name in ("alice", "bob")}
    common = [str(KAFRAY_BIN), "worker", "--brokers", broker.bootstrap, "--create-topics", "2",
              "--metrics-addr", "127.0.0.1:0", "--status-interval", "1"]
    bob_kafka = json.dumps([["security.protocol", "SASL_SSL"], ["sasl.mechanisms", "SCRAM-SHA-256"],
                            ["sasl.username", "bob"], ["sasl.password", BOB_PASSWORD],
                            ["ssl.ca.location", broker.ca_location]])
    workers = {
        "alice": subprocess.Popen(common + ["--kafka-config", str(properties), "--group", "alice"], cwd=REPO,
                                  stderr=logs["alice"].open("w")),
        "bob": subprocess.Popen(common + ["--group", "bob", "--output-topic", "predictions-bob"], cwd=REPO,
                                stderr=logs["bob"].open("w"), env={**os.environ, "KAFRAY_KAFKA": bob_kafka}),
    }
    try:
        for name, topic in (("alice", "predictions"), ("bob", "predictions-bob")):
            report = kafray_cli("eval", "--brokers", broker.bootstrap, "--kafka-config", str(properties),
                                "--topic", topic, "--expect", "300", "--json", "--timeout", "120", timeout=200)
            assert report.returncode == 0, report.stderr
            assert json.loads(report.stdout)["distinct_frames"] == 300, (name, report.stdout)
        for name, worker in workers.items():
            assert worker.poll() is None, f"{name}'s worker ended: {logs[name].read_text()[-2000:]}"
            shown = arguments_of(worker.pid)
            assert "worker" in shown and PASSWORD not in shown and BOB_PASSWORD not in shown, shown
        endpoint = wait_for(lambda: _endpoint(logs["alice"]), 30, "alice's worker to log its metrics endpoint")
        with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as r:
            scrape = r.read().decode()
        assert "kafray_frames_predicted" in scrape and PASSWORD not in scrape
    finally:
        for worker in workers.values():
            worker.send_signal(signal.SIGTERM)
        codes = {name: worker.wait(60) for name, worker in workers.items()}
    assert codes == {"alice": 0, "bob": 0}, codes
    for name, log in logs.items():
        text = log.read_text()
        assert "worker done: 300 predicted" in text, text[-2000:]
        assert PASSWORD not in text and BOB_PASSWORD not in text, f"{name}'s log shows a password"
    predictions = read_all(broker, "predictions", 300)
    assert len(predictions) >= 300
    assert not [r for r in predictions if PASSWORD.encode() in r[0] or any(PASSWORD.encode() in (v or b"")
                                                                          for _, v in r[1])]


def _endpoint(log: Path) -> str | None:
    for line in log.read_text().splitlines():
        if "metrics at http://" in line:
            return line.split("http://", 1)[1].split("/", 1)[0]
    return None


def test_the_demo_runs_over_sasl_ssl_on_a_given_cluster(secured):
    broker, properties = secured
    out = kafray_cli("demo", "--brokers", broker.bootstrap, "--kafka-config", str(properties), "-n", "500", "--json",
                     timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["distinct_frames"] == 500 and report["accuracy"] > 0.95, report
    assert PASSWORD not in out.stdout + out.stderr


def test_a_wrong_password_fails_the_start_naming_the_mechanism_and_the_user_but_not_the_password(secured, tmp_path):
    broker, properties = secured
    wrong = tmp_path / "wrong.properties"
    wrong.write_text(properties.read_text().replace(PASSWORD, "not-the-Right-one-42"))
    out = kafray_cli("worker", "--brokers", broker.bootstrap, "--kafka-config", str(wrong), "--metrics-addr", "",
                     timeout=120)
    assert out.returncode == 1, out.stderr
    said = out.stderr
    assert "authentication failed" in said and "SCRAM-SHA-512" in said and '"alice"' in said, said
    assert "not-the-Right-one-42" not in said


def test_a_property_librdkafka_refuses_is_named_without_its_secret_value(secured, tmp_path):
    """Java's client.properties may hold properties librdkafka does not know; rdkafka's message
    for one ends with its value."""
    broker, properties = secured
    java = tmp_path / "java.properties"
    java.write_text(properties.read_text() + "ssl.truststore.password=Trust-Store-s3cret\n")
    java.chmod(0o600)
    out = kafray_cli("worker", "--brokers", broker.bootstrap, "--kafka-config", str(java), "--metrics-addr", "",
                     timeout=60)
    assert out.returncode == 1 and "ssl.truststore.password" in out.stderr, out.stderr[-2000:]
    assert "Trust-Store-s3cret" not in out.stderr and "***" in out.stderr, out.stderr[-2000:]


def test_plaintext_to_a_tls_listener_and_an_untrusted_certificate_each_fail_with_the_fix(secured):
    broker, _ = secured
    plaintext = kafray_cli("worker", "--brokers", broker.bootstrap, "--metrics-addr", "", timeout=120)
    assert plaintext.returncode == 1, plaintext.stderr
    assert "security.protocol=SSL" in plaintext.stderr, plaintext.stderr
    untrusted = kafray_cli("worker", "--brokers", broker.bootstrap, "--metrics-addr", "",
                           "-X", "security.protocol=SASL_SSL", "-X", "sasl.mechanisms=SCRAM-SHA-512",
                           "-X", "sasl.username=alice", "-X", "sasl.password=${env:KAFRAY_TEST_PASSWORD}",
                           env={**os.environ, "KAFRAY_TEST_PASSWORD": PASSWORD}, timeout=120)
    assert untrusted.returncode == 1, untrusted.stderr
    assert "certificate" in untrusted.stderr and "ssl.ca.location" in untrusted.stderr, untrusted.stderr


def test_turning_tls_verification_off_is_refused_without_the_insecure_flag(secured):
    broker, properties = secured
    off = ["-X", "enable.ssl.certificate.verification=false"]
    refused = kafray_cli("worker", "--brokers", broker.bootstrap, "--kafka-config", str(properties), *off,
                         "--metrics-addr", "", timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "--insecure-skip-tls-verify" in refused.stderr and "ssl.ca.location" in refused.stderr, refused.stderr
    # Accepted with it, and said: a client without the CA connects.
    no_ca = [line for line in properties.read_text().splitlines() if not line.startswith("ssl.ca.location")]
    kafka = dict(line.split("=", 1) for line in no_ca if "=" in line and not line.startswith("#"))
    worker = kafray.Worker(brokers=broker.bootstrap, group="insecure", create_topics=2, metrics_addr="",
                           kafka={**kafka, "enable.ssl.certificate.verification": "false"},
                           insecure_skip_tls_verify=True).start()
    try:
        wait_for(lambda: worker.stats()["joined"], 60, "the worker to join without verifying the broker")
    finally:
        worker.stop(timeout=60)
    with pytest.raises(ValueError, match="insecure-skip-tls-verify"):
        kafray.Worker(brokers=broker.bootstrap, kafka={**kafka, "enable.ssl.certificate.verification": "false"})


def test_a_ray_deployment_over_sasl_ssl_predicts_every_frame_and_the_password_shows_nowhere(ray_cluster, secured,
                                                                                            deployments):
    """The password is read from the file on the driver; it reaches the workers through the
    controller, never in an actor's creation arguments, which Ray records and shows."""
    import ray

    from kafray import ray as kray
    from kafray import secrets

    broker, properties = secured
    name = f"secure-{os.getpid()}"
    d = kray.Deployment.start(2, name=name, address=ray_cluster, brokers=broker.bootstrap,
                              kafka_config=str(properties), input_topic="ray-frames", output_topic="ray-predictions",
                              batch_size=20, create_topics=4)
    deployments.append(d)
    produced = kafray_cli("produce", "mnist", "--brokers", broker.bootstrap, "--kafka-config", str(properties),
                          "--topic", "ray-frames", "--limit", "1000", "-q", timeout=120)
    assert produced.returncode == 0, produced.stderr
    report = kafray_cli("eval", "--brokers", broker.bootstrap, "--kafka-config", str(properties),
                        "--topic", "ray-predictions", "--expect", "1000", "--json", "--timeout", "120", timeout=200)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["distinct_frames"] == 1000, report.stdout

    shown = {"stats": json.dumps(d.stats()), "eval": report.stdout + report.stderr}
    cli = subprocess.run([str(REPO / ".venv" / "bin" / "kafray-ray"), "stats", "--name", name,
                          "--address", ray_cluster, "--json"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and '"predicted"' in cli.stdout, cli.stderr[-2000:]
    shown["kafray-ray stats"] = cli.stdout + cli.stderr
    status = ray.get(d.controller().status.remote())
    shown["targets file"] = Path(status["targets_file"]).read_text()
    endpoints = [w["metrics_endpoint"] for w in d.workers()] + [status["metrics_endpoint"]]
    for endpoint in endpoints:
        with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as r:
            shown[f"metrics of {endpoint}"] = r.read().decode()
    for index, actor in d.actors.items():  # what the actors were created with
        shown[f"spec of actor {index}"] = json.dumps(ray.get(actor.spec.remote()))
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file():
            shown[str(path)] = path.read_bytes().decode(errors="replace")
    assert len(shown) > 10 and any("kafray" in text for text in shown.values())
    assert not [where for where, text in shown.items() if PASSWORD in text]

    # The controller keeps them on its host for its own restarts, for its user alone.
    kept = secrets._path(name)
    assert kept.stat().st_mode & 0o077 == 0 and json.loads(kept.read_text())["sasl.password"] == PASSWORD
    finals = d.stop()
    assert sum(f["predicted"] for f in finals) == 1000, finals
    assert not kept.exists(), "the deployment's secrets outlived it"


def test_oauthbearer_takes_its_token_from_an_oidc_endpoint_and_keeps_the_client_secret_to_itself(secured):
    """librdkafka is built with libcurl, so OAUTHBEARER can fetch its token from an OIDC
    endpoint (client credentials). A real token endpoint (an HTTP server here) sees the request;
    this broker offers SCRAM only, so the start then fails, naming the mechanism."""
    import base64
    import http.server
    import threading

    broker, _ = secured
    secret = "oidc-Client-s3cret"
    seen = []

    def jwt(claims: dict) -> str:
        part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
        return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"

    class TokenEndpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            seen.append((self.path, self.headers.get("Authorization"), body))
            token = jwt({"sub": "kafray", "iat": int(time.time()), "exp": int(time.time()) + 3600})
            reply = json.dumps({"access_token": token, "token_type": "bearer", "expires_in": 3600}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = kafray_cli("worker", "--brokers", broker.bootstrap, "--metrics-addr", "",
                         "-X", "security.protocol=SASL_SSL", "-X", f"ssl.ca.location={broker.ca_location}",
                         "-X", "sasl.mechanisms=OAUTHBEARER", "-X", "sasl.oauthbearer.method=oidc",
                         "-X", "sasl.oauthbearer.client.id=kafray-worker",
                         "-X", "sasl.oauthbearer.client.secret=${env:KAFRAY_TEST_OIDC_SECRET}",
                         "-X", f"sasl.oauthbearer.token.endpoint.url=http://127.0.0.1:{server.server_port}/token",
                         env={**os.environ, "KAFRAY_TEST_OIDC_SECRET": secret}, timeout=120)
    finally:
        server.shutdown()
    assert seen, f"the token endpoint was never asked: {out.stderr[-2000:]}"
    path, authorization, body = seen[0]
    assert path == "/token" and "grant_type=client_credentials" in body, seen[0]
    assert authorization == "Basic " + base64.b64encode(f"kafray-worker:{secret}".encode()).decode(), seen[0]
    assert out.returncode == 1 and "OAUTHBEARER" in out.stderr and "kafray-worker" in out.stderr, out.stderr[-2000:]
    assert secret not in out.stderr
