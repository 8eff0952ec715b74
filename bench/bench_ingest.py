"""Ingest throughput of the node against DCMTK storescp, same data, same run.

    python bench/bench_ingest.py [--quick]

DCMTK ``storescu`` (TCP_NODELAY=1) sends 100 CT instances of 512x512 and 500
of 64x64 over one association and over four parallel associations, first to
DCMTK ``storescp`` (writes to disk, no fsync) and then to the node's
:class:`~medsegagent.node.intake.StorageSCP` (durable writes: fsync + atomic
rename before the response).  Writes a markdown table to stdout and to
``bench/results/ingest.md`` with instances/s and the node/storescp ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medsegagent.dicom.image_writer import StudyInfo, deterministic_uid, write_series
from medsegagent.dicom.volume import Geometry
from medsegagent.node.intake import StorageSCP

ENV = {**os.environ, "TCP_NODELAY": "1"}
RESULTS = Path(__file__).parent / "results" / "ingest.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int) -> None:
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def make_series(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` CT slices of ``size``x``size`` (noise; content does not matter for ingest)."""
    geometry = Geometry((count, size, size), (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1.0, 0.8, 0.8))
    image = np.random.default_rng(0).normal(40, 20, geometry.shape).astype(np.float32)
    study = StudyInfo(study_instance_uid=deterministic_uid("bench", size), patient_name="BENCH^INGEST",
                      patient_id="BENCH", accession_number="B1")  # fmt: skip
    return write_series(image, geometry, "CT", folder, study=study, series_number=1, series_description="BENCH",
                        frame_of_reference_uid=deterministic_uid("bench-for", size))  # fmt: skip


def send(files: list[Path], port: int, called: str, parallel: int) -> float:
    """Seconds for ``parallel`` storescu processes to send ``files`` (split evenly)."""
    chunks = [files[i::parallel] for i in range(parallel)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["/usr/bin/storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, chunk)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - started


def run_storescp(files: list[Path], parallel: int, out: Path) -> float:
    port = _free_port()
    out.mkdir(parents=True, exist_ok=True)
    # --fork: one process per association, so parallel associations really run in parallel.
    proc = subprocess.Popen(["/usr/bin/storescp", "--fork", "-aet", "PEER", "-od", str(out), str(port)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait(port)
        return send(files, port, "PEER", parallel)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run_node(files: list[Path], parallel: int, spool: Path) -> float:
    scp = StorageSCP(spool, ae_title="MEDSEG", host="127.0.0.1", port=0, max_associations=8)
    scp.start()
    try:
        return send(files, scp.port, "MEDSEG", parallel)
    finally:
        scp.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data set (seconds), for tests")
    args = parser.parse_args(argv)
    cases = [(20, 128), (50, 64)] if args.quick else [(100, 512), (500, 64)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        for count, size in cases:
            files = make_series(root / f"src{size}", count, size)
            for parallel in (1, 4):
                peer = run_storescp(files, parallel, root / f"storescp{size}-{parallel}")
                node = run_node(files, parallel, root / f"node{size}-{parallel}")
                rows.append((f"{count} x {size}²", parallel, count / peer, count / node, peer / node))
    lines = [
        "| data | associations | DCMTK storescp (inst/s) | node, durable (inst/s) | node / storescp |",
        "|---|---|---|---|---|",
        *[f"| {d} | {p} | {a:.0f} | {b:.0f} | {r:.2f} |" for d, p, a, b, r in rows],
        "",
        f"`python bench/bench_ingest.py{' --quick' if args.quick else ''}` on {os.cpu_count()} cores; sender: "
        "DCMTK storescu with TCP_NODELAY=1. storescp writes without fsync; the node fsyncs each instance and "
        "its directory before answering.",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text("# Ingest throughput\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
