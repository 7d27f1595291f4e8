"""The paper's preliminary study: distributed MNIST inference over many files, Spark (P partitions,
``mapPartitions``) against Ray (one task per file, round-robin over nodes), with per-task records.

    python -m kafray.study --files 1000 --per-file 10 --nodes 2 --out bench/results/batch

writes into ``--out``:

- ``tasks.csv``: one row per task: engine, nodes, partitions, file, node, worker, start_s, end_s
  (seconds since the run began), images, correct, error;
- ``runs.csv``: one row per run: engine, nodes, partitions, files, images, accuracy, wall_s;
- ``timeline.png``: per-task timelines of the largest run of each engine (the paper's Fig. 4/7);
- ``total_time.png``: total time against the number of nodes (the paper's Fig. 3);
- ``breakdown.png``: per node count, the time to launch the workers, to read the files and to
  evaluate them, and what is left of the wall time (scheduling): the paper's Fig. 6.

``--profile paper`` uses files of the paper's size: the whole raw MNIST test set (10,000 digits,
7.8 MB) per file, 40 files, so that a run fits in a few minutes on 2 cores.

On Ray the driver ships the files through Ray's object store (a task's reading time includes
fetching its file); Spark's executors read them from a folder they all see.

Without ``--address`` it starts a Ray cluster of ``--nodes`` nodes on this machine (one CPU each),
and without ``--spark-master`` a Spark standalone cluster of ``--nodes`` one-core workers, so
"nodes" means the same on both engines; both are stopped at the end.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import kafray

DEFAULT_MNIST = ("assets/mnist/t10k-images-idx3-ubyte.gz", "assets/mnist/t10k-labels-idx1-ubyte.gz")


def make_shards(out_dir: str, files: int, per_file: int, images: str | None = None,
                labels: str | None = None) -> list[str]:
    """`files` MNIST shards of `per_file` digits from the real test set (wrapping around it)."""
    images = images or DEFAULT_MNIST[0]
    labels = labels or DEFAULT_MNIST[1]
    for p in (images, labels):
        if not os.path.isfile(p):
            raise ValueError(f"{p}: no such file; run from the kafray checkout or pass --images/--labels")
    return kafray.write_mnist_shards(images, labels, out_dir, files, per_file)


def _relative(records: list[dict], began: float) -> None:
    for r in records:
        r["start_s"] = r["start"] - began
        r["end_s"] = r["end"] - began


PROFILES = {"default": {"files": 1000, "per_file": 10}, "paper": {"files": 40, "per_file": 10_000}}


def summarize(engine: str, nodes: int, partitions: int | None, records: list[dict], wall: float,
              launch_s: float = 0.0, ship_s: float = 0.0) -> dict:
    """One run's totals. read_s and evaluate_s are the tasks' times summed and shared over the
    nodes (what each node spent, on average); other_s is the rest of the wall time (scheduling,
    results, idle nodes)."""
    images = sum(r["images"] for r in records)
    correct = sum(r["correct"] or 0 for r in records)
    read = sum(r.get("read_s", 0.0) for r in records) / nodes
    evaluate = sum(r.get("evaluate_s", 0.0) for r in records) / nodes
    return {
        "engine": engine, "nodes": nodes, "partitions": partitions if partitions is not None else "",
        "files": len(records), "images": images, "errors": sum(1 for r in records if r["error"]),
        "accuracy": round(correct / images, 4) if images else "", "wall_s": round(wall, 3),
        "task_mean_ms": round(1000 * sum(r["end"] - r["start"] for r in records) / max(1, len(records)), 3),
        "launch_s": round(launch_s, 3), "ship_s": round(ship_s, 3), "read_s": round(read, 6),
        "evaluate_s": round(evaluate, 6), "other_s": round(max(0.0, wall - read - evaluate), 3),
    }


TASK_FIELDS = ["engine", "nodes", "partitions", "file", "node", "worker", "start_s", "end_s", "images", "correct",
               "error", "read_s", "evaluate_s"]


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_timeline(path: Path, runs: list[tuple[str, list[dict]]]) -> None:
    """One panel per run: a lane per worker process (grouped by node), a bar per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 2.2 + 1.6 * len(runs)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, records) in zip(axes[:, 0], runs):
        lanes = sorted({(r["node"], r["worker"]) for r in records})
        lane = {w: i for i, (_, w) in enumerate(lanes)}
        nodes = sorted({n for n, _ in lanes})
        for r in records:
            colour = colours[nodes.index(r["node"]) % len(colours)]
            ax.barh(lane[r["worker"]], max(r["end_s"] - r["start_s"], 1e-4), left=r["start_s"], height=0.6,
                    color=colour, edgecolor="none")
        ax.set_yticks(range(len(lanes)), [w for _, w in lanes], fontsize=8)
        ax.set_xlim(left=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds since the job was submitted")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_total_time(path: Path, summaries: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple, list[tuple[int, float]]] = {}
    for s in summaries:
        key = (s["engine"], int(s["partitions"] or 0))
        series.setdefault(key, []).append((int(s["nodes"]), float(s["wall_s"])))
    for (engine, parts), points in sorted(series.items()):
        name = "Ray (task per file)" if engine == "ray" else f"Spark ({parts} partitions)"
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("nodes")
    ax.set_ylabel("total time (s)")
    ax.set_xticks(sorted({int(s["nodes"]) for s in summaries}))
    ax.set_ylim(bottom=0)
    ax.set_title(f"{summaries[0]['files']} files, {summaries[0]['images']} MNIST digits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_breakdown(path: Path, summaries: list[dict]) -> None:
    """The paper's Fig. 6: per node count, launch + read + evaluate + the rest, stacked; one
    group of bars per engine (Spark: its first partition count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for engine in ("ray", "spark"):
        mine = [s for s in summaries if s["engine"] == engine]
        if engine == "spark" and mine:
            first = str(mine[0]["partitions"])
            mine = [s for s in mine if str(s["partitions"]) == first]
        if mine:
            groups.append((engine, sorted(mine, key=lambda s: int(s["nodes"]))))
    parts = [("launch_s", "launch the workers"), ("read_s", "read the files"), ("evaluate_s", "evaluate"),
             ("other_s", "the rest (scheduling, idle)")]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.5), squeeze=False, sharey=True)
    for ax, (engine, runs) in zip(axes[0], groups):
        x = [str(r["nodes"]) for r in runs]
        bottom = [0.0] * len(runs)
        for key, name in parts:
            values = [float(r.get(key) or 0) for r in runs]
            ax.bar(x, values, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, values)]
        title = "Ray, one task per file" if engine == "ray" else f"Spark, {runs[0]['partitions']} partitions"
        ax.set_title(f"{title}: {runs[0]['files']} files, {runs[0]['images']} digits", fontsize=10)
        ax.set_xlabel("nodes")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("seconds")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(out: Path) -> None:
    """Redraws both charts from tasks.csv and runs.csv (timelines: each engine's largest run)."""
    tasks = read_csv(out / "tasks.csv")
    summaries = read_csv(out / "runs.csv")
    for t in tasks:
        t["start_s"], t["end_s"] = float(t["start_s"]), float(t["end_s"])
    timelines = []
    for engine, title in (("ray", "Ray: one task per file, round-robin over {n} node(s)"),
                          ("spark", "Spark: {p} partitions (mapPartitions) on {n} node(s)")):
        mine = [s for s in summaries if s["engine"] == engine]
        if mine:
            n = max((s["nodes"] for s in mine), key=int)
            p = min((s["partitions"] for s in mine if s["nodes"] == n), key=lambda x: int(x or 0))
            records = [t for t in tasks if (t["engine"], t["nodes"], t["partitions"]) == (engine, n, p)]
            timelines.append((title.format(n=n, p=p), records))
    plot_timeline(out / "timeline.png", timelines)
    plot_total_time(out / "total_time.png", summaries)
    plot_breakdown(out / "breakdown.png", summaries)


# ---- Ray: one task per file, round-robin over nodes (the paper's section II) ----

def _classify_shard(shard: list, model: str, batch_size: int) -> dict:
    """A Ray task: classifies one shipped shard. The shard comes as [ref] so that fetching it
    from the object store is timed as reading."""
    import ray

    from kafray import batch

    start = time.time()
    name, images, labels = ray.get(shard[0])
    record = batch.classify_shard_record(name, images, labels, model, batch_size, start, time.time() - start)
    record["node_id"] = ray.get_runtime_context().get_node_id()
    return record


def ship_shards(paths: list[str]) -> list:
    """Each MNIST shard (images and labels) into Ray's object store: no node reads a shared folder."""
    import ray

    from kafray import _native

    refs = []
    for p in paths:
        with open(p, "rb") as f:
            images = f.read()
        with open(_native.mnist_shard_labels(p), "rb") as f:
            labels = f.read()
        refs.append(ray.put((os.path.basename(p), images, labels)))
    return refs


def classify_files(paths: list[str], *, nodes: int | None = None, model: str = "mnist", batch_size: int = 64,
                   address: str | None = "auto") -> dict:
    """Classifies every file with one Ray task each, task i pinned to node i mod `nodes` (the
    paper's round-robin). The driver ships the files through Ray's object store first. Returns
    {"records": one per task (file, node, worker pid, start, end, images, correct, error, read_s,
    evaluate_s), "began": submission time (epoch s), "wall_s": to the last result, "launch_s":
    starting a worker per node with the model loaded, "ship_s": putting the files in the store}."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from kafray.ray.cluster import ClusterTooSmall, cluster_nodes, connect

    connect(address)
    alive = cluster_nodes()
    if nodes is None:
        nodes = len(alive)
    if not 1 <= nodes <= len(alive):
        raise ClusterTooSmall(f"asked for {nodes} node(s); the cluster has {len(alive)} with CPUs")
    chosen = alive[:nodes]
    label = {n["NodeID"]: f"node-{i + 1}" for i, n in enumerate(chosen)}
    model_path = kafray.find_model(model)
    shipping_began = time.time()
    shards = ship_shards(paths)
    ship_s = time.time() - shipping_began
    task = ray.remote(num_cpus=1, max_retries=3)(_classify_shard)

    def on(node: dict):
        return task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))

    # Launch (the paper's first part): a worker process per node with the model loaded.
    launching = time.time()
    ray.get([on(n).remote([shards[0]], model_path, batch_size) for n in chosen])
    launch_s = time.time() - launching
    began = time.time()
    refs = [on(chosen[i % nodes]).remote([s], model_path, batch_size) for i, s in enumerate(shards)]
    records = ray.get(refs)
    wall = time.time() - began
    by_name = {os.path.basename(p): p for p in paths}
    for r in records:
        r["engine"] = "ray"
        r["node"] = label.get(r.pop("node_id"), "other")
        r["worker"] = f"{r['node']}/pid-{r['pid']}"
        r["file"] = by_name[r["file"]]
    return {"records": records, "began": began, "wall_s": wall, "launch_s": launch_s, "ship_s": ship_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kafray.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="ray,spark", help="comma-separated: ray, spark")
    p.add_argument("--profile", choices=sorted(PROFILES), default="default",
                   help="default: 1000 files of 10 digits; paper: 40 files of the whole raw test set (7.8 MB)")
    p.add_argument("--files", type=int, help="files (default: the profile's)")
    p.add_argument("--per-file", type=int, help="digits per shard file (default: the profile's)")
    p.add_argument("--nodes", type=int, default=2, help="runs use 1..N nodes")
    p.add_argument("--partitions", default="8,16,32,48", help="Spark partition counts")
    p.add_argument("--model", default="mnist")
    p.add_argument("--batch-size", type=int, default=64, help="images per inference call within a file")
    p.add_argument("--address", help="an existing Ray cluster (default: start one with --nodes nodes here)")
    p.add_argument("--spark-master", help="e.g. local[2] or spark://host:7077 (default: a local standalone "
                                          "cluster of --nodes one-core workers)")
    p.add_argument("--shards", help="folder of existing shards (default: generate them)")
    p.add_argument("--images", help="IDX images to cut shards from (default: the MNIST test set in assets/)")
    p.add_argument("--labels")
    p.add_argument("--out", default="bench/results/batch")
    p.add_argument("--plot-only", action="store_true", help="redraw the charts from the CSVs in --out")
    args = p.parse_args(argv)
    if args.plot_only:
        replot(Path(args.out))
        return 0

    args.files = args.files or PROFILES[args.profile]["files"]
    args.per_file = args.per_file or PROFILES[args.profile]["per_file"]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"ray", "spark"}
    if unknown or not engines:
        p.error(f"--engines {args.engines!r}: expected ray, spark or both")
    if args.nodes < 1 or args.files < 1 or args.per_file < 1:
        p.error("--nodes, --files and --per-file must be at least 1")
    try:
        partitions = [int(x) for x in args.partitions.split(",")]
    except ValueError:
        p.error(f"--partitions {args.partitions!r}: expected numbers, e.g. 8,16,32,48")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    shard_dir = args.shards or tempfile.mkdtemp(prefix="kafray-shards-")
    if args.shards:
        paths = sorted(str(p) for p in Path(shard_dir).glob("*-images-idx3-ubyte*"))[: args.files]
    else:
        paths = make_shards(shard_dir, args.files, args.per_file, args.images, args.labels)
    if not paths:
        p.error(f"no shards (*-images-idx3-ubyte) in {shard_dir}")
    print(f"study: {len(paths)} files in {shard_dir}", flush=True)

    tasks: list[dict] = []
    summaries: list[dict] = []
    timelines: list[tuple[str, list[dict]]] = []

    def record(engine: str, nodes: int, parts: int | None, run: dict) -> list[dict]:
        records = run["records"]
        _relative(records, run["began"])
        for r in records:
            r.update(engine=engine, nodes=nodes, partitions=parts if parts is not None else "")
        tasks.extend(records)
        s = summarize(engine, nodes, parts, records, run["wall_s"], run["launch_s"], run["ship_s"])
        summaries.append(s)
        print(f"study: {engine:5} nodes={nodes} partitions={s['partitions'] or '-':>3} files={s['files']} "
              f"images={s['images']} accuracy={s['accuracy']} errors={s['errors']} wall={s['wall_s']:.2f} s "
              f"(launch {s['launch_s']:.2f}, read {s['read_s']:.2f}, evaluate {s['evaluate_s']:.2f}, "
              f"rest {s['other_s']:.2f})", flush=True)
        return records

    if "ray" in engines:
        import ray

        from kafray.ray.cluster import connect

        cluster = None
        # A caller already connected (a test, a notebook) keeps its connection and its cluster.
        ours = not ray.is_initialized()
        if args.address is None and ours:
            from ray.cluster_utils import Cluster

            # The object store holds the shipped files (the paper profile: 40 x 7.8 MB).
            node = dict(num_cpus=1, memory=2 * 2**30, object_store_memory=512 * 2**20)
            cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
            for _ in range(args.nodes - 1):
                cluster.add_node(**node)
            cluster.wait_for_nodes()
        try:
            connect(cluster.address if cluster else args.address)
            for n in range(1, args.nodes + 1):
                records = record("ray", n, None, classify_files(paths, nodes=n, model=args.model,
                                                                batch_size=args.batch_size))
                if n == args.nodes:
                    timelines.append((f"Ray: one task per file, round-robin over {n} node(s)", records))
        finally:
            if ours:
                ray.shutdown()
            if cluster:
                cluster.shutdown()

    if "spark" in engines:
        from kafray import spark as kspark

        standalone = None if args.spark_master else kspark.LocalStandalone(workers=args.nodes)
        try:
            for n in range(1, args.nodes + 1):
                master = args.spark_master or standalone.url
                for parts in partitions:
                    records = record("spark", n, parts, kspark.classify_files(
                        paths, master=master, partitions=parts, nodes=n, model=args.model, batch_size=args.batch_size))
                    if n == args.nodes and parts == partitions[0]:
                        timelines.append((f"Spark: {parts} partitions (mapPartitions) on {n} node(s)", records))
        finally:
            if standalone:
                standalone.stop()

    write_csv(out / "tasks.csv", tasks, TASK_FIELDS)
    write_csv(out / "runs.csv", summaries, list(summaries[0]))
    plot_timeline(out / "timeline.png", timelines)
    plot_total_time(out / "total_time.png", summaries)
    plot_breakdown(out / "breakdown.png", summaries)
    if not args.shards:
        shutil.rmtree(shard_dir, ignore_errors=True)
    print(f"study: wrote {out}/tasks.csv, runs.csv, timeline.png, total_time.png, breakdown.png", flush=True)
    return 0


if __name__ == "__main__":
    t = time.time()
    code = main()
    print(f"study: {time.time() - t:.0f} s", file=sys.stderr)
    sys.exit(code)
