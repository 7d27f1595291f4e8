"""Runs on the Ray head's host in test_multihost.py: deploys, streams, kills the other host's
worker, scales and updates the model, then prints what happened as one JSON line."""
import json
import os
import shutil
import signal
import subprocess
import sys

import ray

import kafray
from conftest import actor_ready, wait_for
from kafray import ray as kray

head, broker, repo = sys.argv[1:4]
cli = os.path.join(repo, "target", "release", "kafray")
# The models exist only in this host's private /tmp: the other host gets them through Ray.
os.makedirs("/tmp/models", exist_ok=True)
spec = 'layout = "nchw"\nheight = 28\nwidth = 28\ncolor = "gray"\nscale = 1.0\nmean = [0.0]\nstd = [1.0]\n'
for name in ("digits", "digits_v2"):
    shutil.copy(kafray.find_model("mnist"), f"/tmp/models/{name}.onnx")
    with open(f"/tmp/models/{name}.toml", "w") as f:
        f.write(spec)

kray.connect(f"{head}:6379")
n = 6000
d = kray.Deployment.start(2, name="mh", address=None, brokers=broker, model="/tmp/models/digits.onnx",
                          create_topics=4, batch_size=20, status_interval_s=1)
placed = {i: ray.get(a.ready.remote(), timeout=60) for i, a in d.actors.items()}
ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
producer = subprocess.Popen([cli, "produce", "mnist", "--brokers", broker, "--limit", str(n), "--rate", "400",
                             "--partitions", "4", "-q"], cwd=repo)


wait_for(lambda: d.stats()["predicted"] > 500, 90, "the first predictions")
# Kill the worker on the other host (same PID namespace: the pid is valid here).
other = next(i for i, p in placed.items() if ips[p["node_id"]] != head)
os.kill(placed[other]["pid"], signal.SIGKILL)


again = wait_for(lambda: (r := actor_ready(d.actors[other])) and r["pid"] != placed[other]["pid"] and r, 120,
             "Ray to restart the killed worker")
d.scale(3)
wait_for(lambda: all(w.get("assigned_partitions", 0) > 0 for w in d.workers()), 90, "3 workers to own partitions")
d.scale(2)  # room for the update's extra worker (2 hosts x 2 CPUs)
update = d.update(model="/tmp/models/digits_v2.onnx")
d.workers()  # the controller replaced the workers: refresh them by name
after = {i: ray.get(a.ready.remote(), timeout=60) for i, a in d.actors.items()}
assert producer.wait(180) == 0
report = json.loads(subprocess.run([cli, "eval", "--brokers", broker, "--topic", "predictions", "--expect", str(n),
                                    "--timeout", "180", "--json"], capture_output=True, text=True, cwd=repo).stdout)
stats = d.stats()
d.stop()
print(json.dumps({
    "n": n, "report": report, "update": update, "restarted": again,
    "placed": [{"ip": ips[p["node_id"]], "model_path": p["model_path"]} for p in placed.values()],
    "after": [{"ip": ips[p["node_id"]], "model_path": p["model_path"]} for p in after.values()],
    "killed_ip": ips[placed[other]["node_id"]], "restarted_ip": ips[again["node_id"]],
    "restarts": stats["restarts"], "failed": stats["failed"],
}), flush=True)
