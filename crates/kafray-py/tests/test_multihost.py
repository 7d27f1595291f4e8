"""Three hosts made of namespaces (bench/hosts.py): the broker on one, the Ray head and the
driver on another, a second Ray node on a third; each with its own network address and its own
/tmp. The model exists only in the driver's /tmp. In that cluster: deploy, stream, kill the
other host's worker, scale, update the model; nothing may be lost."""
import json
import subprocess

import pytest

from bench.hosts import RAY_ENV, Hosts, missing, start_broker_and_ray
from conftest import KAFRAY_BIN, REPO

VENV = REPO / ".venv" / "bin"


def test_a_cluster_of_three_hosts_ships_the_model_survives_a_kill_scales_and_updates(tmp_path):
    why = missing()
    if why:
        pytest.skip(f"no network namespaces here ({why}): the multi-host test needs root and `ip netns`")
    assert KAFRAY_BIN.is_file(), "cargo build --release first (the README's test command does)"
    # The checkout and ../shared stay visible on every host, wherever they lie (their parent may
    # be /tmp itself, which every host has its own of).
    with Hosts(["broker", "head", "node2"], keep=[REPO, REPO.parent / "shared"]) as h:
        broker = start_broker_and_ray(h, str(VENV), broker_log=open(tmp_path / "broker.log", "w"))
        driver = h.run("head", [str(VENV / "python"), str(REPO / "crates/kafray-py/tests/multihost_driver.py"),
                                h.ip["head"], broker, str(REPO)],
                       env=RAY_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
        out, err = driver.communicate(timeout=900)
        assert driver.returncode == 0, f"driver failed:\n{err[-4000:]}"
        result = json.loads(out.strip().splitlines()[-1])
        other_tmp = h.run("node2", ["ls", "-a", "/tmp"], stdout=subprocess.PIPE, text=True).communicate()[0].split()

    report = result["report"]
    assert report["distinct_frames"] == result["n"], f"frames lost: {report}"
    assert report["accuracy"] >= 0.98, report
    assert set(report["per_model"]) == {"digits", "digits_v2"}, report["per_model"]
    # The model reached the host without a copy: its workers load it from that host's own cache.
    assert "models" not in other_tmp, other_tmp
    ips = {p["ip"] for p in result["placed"]}
    assert ips == {"10.251.73.2", "10.251.73.3"}, result["placed"]
    for p in result["placed"] + result["after"]:
        assert p["model_path"].startswith("/tmp/home/.cache/kafray/models/"), p
    assert all(p["model_path"].endswith("digits_v2.onnx") for p in result["after"]), result["after"]
    assert result["killed_ip"] == "10.251.73.3", result  # Ray restarted it (the driver waited for a new pid)
    assert len(result["update"]["replaced"]) == 2 and not result["failed"], result
    # Re-reads are bounded by what was in flight at each disruption: the kill, the scale up and
    # down, and the 2 replacements, at most max_in_flight (1000) each.
    assert report["duplicates"] <= 5 * 1000, report
