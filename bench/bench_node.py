"""End-to-end overhead of the node per study, everything but model time.

    python bench/bench_node.py [--size 512] [--slices 300]

A phantom CT study is sent with DCMTK ``storescu`` to a running node whose
destination is DCMTK ``storescp``.  Measured from the last instance's
acknowledgement to the SEG's arrival at the destination, then split with the
job's own timings: the configured quiet time (a policy, not work), model
inference, and the rest (study read, planning, fusion, SEG encoding,
delivery, bookkeeping) = the node's overhead.  Writes a markdown table to
stdout and ``bench/results/node.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medsegagent.dicom.image_writer import write_phantom
from medsegagent.dicom.phantom import make_phantom
from medsegagent.node.config import parse_config
from medsegagent.node.service import Node

ENV = {**os.environ, "TCP_NODELAY": "1"}
RESULTS = Path(__file__).parent / "results" / "node.md"
QUIET = 1.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark once and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--request", default="liver, spleen and both kidneys")
    args = parser.parse_args(argv)
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
                     "min_free_disk_mb": 1},
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
            acked = time.perf_counter()
            while not any(p.name.startswith("SG") for p in (root / "pacs").iterdir()):
                if time.perf_counter() - acked > 1800:
                    raise TimeoutError("no SEG after 30 minutes")
                time.sleep(0.02)
            arrived = time.perf_counter()
            job = node.store.list()[0]
        finally:
            node.stop()
            pacs.terminate()
            pacs.wait(timeout=10)
    timings = (job.report or {}).get("timings_s", {})
    inference = float(timings.get("inference", 0.0))
    total = arrived - acked
    overhead = total - QUIET - inference
    rows = [
        ("transfer (storescu, all instances acknowledged)", acked - started),
        ("last instance -> SEG at destination", total),
        ("  quiet time (policy)", QUIET),
        ("  model inference (2 models, parallel)", inference),
        ("  **node overhead** (read, plan, fuse, SEG, deliver, bookkeeping)", overhead),
        *[(f"    pipeline: {k}", float(v)) for k, v in timings.items() if k != "inference"],
    ]
    table = "\n".join(
        [f"Study: {args.slices} x {args.size}² CT, request {args.request!r}, {os.cpu_count()} cores, CPU.", "",
         "| step | seconds |", "|---|---|", *[f"| {name} | {value:.2f} |" for name, value in rows], "",
         f"`python bench/bench_node.py --size {args.size} --slices {args.slices}`"]
    )  # fmt: skip
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# End-to-end overhead per study\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
