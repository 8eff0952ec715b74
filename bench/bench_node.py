"""End-to-end overhead of the node per study, everything but model time.

    python bench/bench_node.py [--size 512] [--slices 300] [--runs 3]

A phantom CT study is sent with DCMTK ``storescu`` to a running node whose
destination is DCMTK ``storescp``.  Measured from the last instance's
acknowledgement to the SEG's arrival at the destination, then split with the
job's own timings: the configured quiet time (a policy, not work), model
inference, and the rest (study read, planning, fusion, SEG encoding,
delivery, bookkeeping) = the node's overhead.  On a shared machine the
run least disturbed by others (the fastest) is the figure; every run is
listed.  Writes a markdown table to stdout and ``bench/results/node.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medsegagent.dicom.image_writer import write_phantom
from medsegagent.dicom.phantom import make_phantom
from medsegagent.node.config import parse_config
from medsegagent.node.memory import resident_mb
from medsegagent.node.service import Node

ENV = {**os.environ, "TCP_NODELAY": "1"}
RESULTS = Path(__file__).parent / "results" / "node.md"
QUIET = 1.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(args: argparse.Namespace) -> dict[str, float]:
    """Send the study to a fresh node once; seconds per step (and the node process's CPU seconds)."""
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        root = Path(tmp)
        phantom = make_phantom("CT", seed=11, slices=args.slices, size=args.size)
        files = write_phantom(phantom, root / "study").series["CT"]
        port = _free_port()
        pacs = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", "-od", str(root / "pacs"), str(port)],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        (root / "pacs").mkdir()
        config = parse_config({
            "node": {"port": 0, "data_dir": str(root / "var"), "quiet_seconds": QUIET, "collection": "demo",
                     "min_free_disk_mb": 1, "retain_memory": args.retain_memory == "on"},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
            "presets": {"BENCH": args.request},
            "instruction_sources": ["preset"],
            "http": {"enabled": False},
        })  # fmt: skip
        node = Node(config, poll_seconds=0.05)
        node.start()
        try:
            started = time.perf_counter()
            subprocess.run(["/usr/bin/storescu", "-aet", "CT", "-aec", "BENCH", "127.0.0.1", str(node.scp.port),
                            *map(str, files)], env=ENV, check=True, capture_output=True)  # fmt: skip
            acked, cpu = time.perf_counter(), time.process_time()
            while not any(p.name.startswith("SG") for p in (root / "pacs").iterdir()):
                if time.perf_counter() - acked > 1800:
                    raise TimeoutError("no SEG after 30 minutes")
                time.sleep(0.02)
            arrived, cpu = time.perf_counter(), time.process_time() - cpu
            job = node.store.list()[0]
        finally:
            node.stop()
            pacs.terminate()
            pacs.wait(timeout=10)
    timings = (job.report or {}).get("timings_s", {})
    inference = float(timings.get("inference", 0.0))
    total = arrived - acked
    return {
        "transfer": acked - started,
        "total": total,
        "inference": inference,
        "overhead": total - QUIET - inference,
        "cpu": cpu,
        "rss": resident_mb(),  # retained memory stays; glibc's defaults give large arrays back
        **{f"pipeline: {k}": float(v) for k, v in timings.items() if k != "inference"},
    }


MODES = ("on", "off")
LABELS = {
    "transfer": "transfer (storescu, all instances acknowledged)",
    "total": "last instance -> SEG at destination",
    "quiet": "  quiet time (policy)",
    "inference": "  model inference (2 models, parallel)",
    "overhead": "  **node overhead** (read, plan, fuse, SEG, deliver, bookkeeping)",
    "cpu": "node process CPU seconds in that time (all threads, models included)",
    "rss": "node process resident memory after the run, MB (the bench's phantom included)",
}


def _child(args: argparse.Namespace) -> list[dict[str, float]]:
    """Every run of one memory mode, each in a fresh node of one fresh process."""
    command = [sys.executable, __file__, "--child", "--size", str(args.size), "--slices", str(args.slices),
               "--request", args.request, "--runs", str(args.runs), "--retain-memory", args.retain_memory]  # fmt: skip
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(args: argparse.Namespace, by_mode: dict[str, list[dict[str, float]]]) -> list[str]:
    """One column per run and, per mode, the fastest run (its overhead is the figure)."""
    best = {mode: min(runs, key=lambda r: r["overhead"]) for mode, runs in by_mode.items()}
    any_best = next(iter(best.values()))
    stages = [k for k in any_best if k.startswith("pipeline")]
    keys = ["transfer", "total", "quiet", "inference", "overhead", *stages, "cpu", "rss"]
    columns = [(f"fastest, retain_memory {m}", best[m]) for m in by_mode]
    columns += [(f"{m}: run {i + 1}", run) for m, runs in by_mode.items() for i, run in enumerate(runs)]
    rows = ["| step | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for key in keys:
        values = [QUIET if key == "quiet" else run.get(key, float("nan")) for _, run in columns]
        rows.append(f"| {LABELS.get(key, f'    {key}')} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    if set(best) == set(MODES):
        ratio = best["off"]["overhead"] / best["on"]["overhead"]
        rows += ["", f"Node overhead, allocator defaults / retained memory: {ratio:.2f}x."]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark ``--runs`` times per memory mode and write the table (each run, and the fastest)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--request", default="liver, spleen and both kidneys")
    parser.add_argument("--runs", type=int, default=1, help="repeat on a fresh node; the fastest run is the figure")
    parser.add_argument("--retain-memory", choices=(*MODES, "both"), default="both",
                        help="node.retain_memory; 'both' runs each in its own process, on first")  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one mode, in this process: the allocator setting is process-wide and one-way
        print(json.dumps([run_once(args) for _ in range(args.runs)]))
        return 0
    load_before = os.getloadavg()[0]
    modes = MODES if args.retain_memory == "both" else (args.retain_memory,)
    by_mode = {mode: _child(argparse.Namespace(**{**vars(args), "retain_memory": mode})) for mode in modes}
    load_after = os.getloadavg()[0]
    command = (f"python bench/bench_node.py --size {args.size} --slices {args.slices} --runs {args.runs}"
               f" --retain-memory {args.retain_memory}")  # fmt: skip
    table = "\n".join(
        [f"Study: {args.slices} x {args.size}² CT, request {args.request!r}, BINARY SEG, "
         f"{os.cpu_count()} cores, CPU. Load average (1 min) before / after: {load_before:.1f} / {load_after:.1f} "
         "(the machine is shared: wall times grow with the load, CPU seconds do not). Run 1 of each "
         "process also loads the models.", "",
         *_table(args, by_mode), "", f"`{command}`"]
    )  # fmt: skip
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# End-to-end overhead per study\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
