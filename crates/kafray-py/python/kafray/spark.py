"""The paper's batch study on Apache Spark: the files in P partitions, one ``mapPartitions`` task
per partition, each calling the same Rust classifier as the Ray tasks (so the comparison is of
scheduling, not of compute).

``master`` is any Spark master URL: ``local[N]`` (one JVM, N task slots), ``spark://host:7077``
(a standalone cluster), or a :class:`LocalStandalone` cluster started here with one worker per
"node", the closest analogue of a multi-node Ray cluster on one machine.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_class() -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-class")


class LocalStandalone:
    """A Spark standalone master plus `workers` workers (1 core each) on this machine; each worker
    is a "node" with its own executor JVM. Stops every process it started."""

    def __init__(self, workers: int = 2, memory: str = "1g", timeout: float = 90.0):
        self.dir = Path(tempfile.mkdtemp(prefix="kafray-spark-"))
        self.procs: list[subprocess.Popen] = []
        port, ui = _free_port(), _free_port()
        self.url = f"spark://127.0.0.1:{port}"
        self.ui = f"http://127.0.0.1:{ui}/json/"
        env = dict(os.environ, SPARK_LOG_DIR=str(self.dir), PYSPARK_PYTHON=sys.executable)
        try:
            self._spawn("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port",
                                   str(port), "--webui-port", str(ui)], env)
            for i in range(1, workers + 1):
                work = self.dir / f"node-{i}"
                work.mkdir()
                self._spawn(f"node-{i}", ["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                          "--cores", "1", "--memory", memory, "--webui-port", str(_free_port()),
                                          "--work-dir", str(work), self.url], env)
            self._wait_workers(workers, timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, args: list[str], env: dict) -> None:
        log = open(self.dir / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen([_spark_class(), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _wait_workers(self, workers: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        alive = 0
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Spark process exited at start; see the logs in {self.dir}")
            try:
                with urllib.request.urlopen(self.ui, timeout=2) as r:
                    alive = json.load(r).get("aliveworkers", 0)
                if alive >= workers:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{alive} of {workers} Spark workers registered within {timeout:.0f} s; see {self.dir}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalStandalone":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _where() -> str:
    """The "node" a Spark task runs on: a standalone executor works in <work-dir>/<app>/<executor>,
    and our LocalStandalone names each worker's work-dir node-N; elsewhere, the host name."""
    cwd = Path.cwd()
    if cwd.parent.name.startswith("app-") and cwd.parent.parent.name.startswith("node-"):
        return cwd.parent.parent.name
    return socket.gethostname()


def _classify_partition(model: str, batch_size: int):
    def run(index, paths):
        from kafray import batch

        node = _where()
        for path in paths:
            record = batch.classify_file_record(path, model, batch_size)
            record.update(node=node, partition=index)
            yield record

    return run


def classify_files(paths: list[str], *, master: str = "local[2]", partitions: int = 8, nodes: int | None = None,
                   model: str = "mnist", batch_size: int = 64) -> dict:
    """Classifies the files in `partitions` partitions with ``mapPartitionsWithIndex``. `nodes`
    caps the executors' total cores on a standalone master. Returns what
    :func:`kafray.study.classify_files` returns (records, began, wall_s, launch_s, ship_s)."""
    import kafray

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.master(master).appName("kafray-batch")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.python.worker.reuse", "true")
               .config("spark.executor.cores", "1")
               .config("spark.executorEnv.PYSPARK_PYTHON", sys.executable))
    if nodes is not None and master.startswith("spark://"):
        builder = builder.config("spark.cores.max", str(nodes))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        model_path = kafray.find_model(model)
        # Launch: executors registered, Python workers forked, the model loaded in each.
        launching = time.time()
        slots = nodes or spark.sparkContext.defaultParallelism
        warm = spark.sparkContext.parallelize(list(paths[:slots]) * 2, slots)
        warm.mapPartitionsWithIndex(_classify_partition(model_path, batch_size)).count()
        launch_s = time.time() - launching
        began = time.time()
        rdd = spark.sparkContext.parallelize(list(paths), partitions)
        records = rdd.mapPartitionsWithIndex(_classify_partition(model_path, batch_size)).collect()
        wall = time.time() - began
    finally:
        spark.stop()
    for r in records:
        r["engine"] = "spark"
        r["worker"] = f"{r['node']}/pid-{r['pid']}"
    # The executors read the files from a path they all see (a shared folder): nothing shipped.
    return {"records": records, "began": began, "wall_s": wall, "launch_s": launch_s, "ship_s": 0.0}
