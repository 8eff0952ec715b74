"""Ingest throughput of the node against DCMTK storescp, same data, same run.

    python bench/bench_ingest.py [--quick]

DCMTK ``storescu`` (TCP_NODELAY=1) sends 100 CT instances of 512x512 and 500
of 64x64 over one association and over four parallel associations to:

* DCMTK ``storescp --fork`` (the peer; writes to disk, no fsync);
* a bare pynetdicom Storage SCP that writes the received bytes and nothing
  else (no checks, no fsync): pynetdicom's own ceiling on this machine, which
  the node's listener replaced (see ``dicom/acceptor.py``);
* the node's intake exactly as ``serve`` runs it (its own acceptor, checks,
  durable write: fsync of the file and its directory before the response,
  arrival recorded in the SQLite job store), with ``intake_processes`` 1 and
  2 (several processes on one port with ``SO_REUSEPORT``);
* the durable writes alone (no DICOM): the bound of any durable receiver on
  this disk.

Writes a markdown table to stdout and to ``bench/results/ingest.md`` with
instances/s and the node/storescp ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from pynetdicom import AE, evt
from pynetdicom import sop_class as sc

from medsegagent.dicom.image_writer import StudyInfo, deterministic_uid, write_series
from medsegagent.dicom.volume import Geometry
from medsegagent.node.intake_pool import IntakePool, IntakeSpec
from medsegagent.node.scu import set_nodelay
from medsegagent.node.spool import IncomingFile

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


def run_bare_pynetdicom(files: list[Path], parallel: int, out: Path) -> float:
    """A minimal pynetdicom SCP: received bytes to a file, no checks, no fsync."""
    out.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title="BARE")
    ae.add_supported_context(sc.CTImageStorage)
    ae.maximum_associations = 8

    def on_store(event: evt.Event) -> int:
        (out / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    handlers = [(evt.EVT_CONN_OPEN, set_nodelay), (evt.EVT_C_STORE, on_store)]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    try:
        return send(files, server.server_address[1], "BARE", parallel)
    finally:
        server.shutdown()


def _cpu_seconds() -> float:
    """User + system CPU of this process (its threads; not its children)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_fsync_floor(files: list[Path], out: Path) -> float:
    """Seconds for the node's durable writes alone (no DICOM): incoming file, fsync, rename, directory fsync."""
    (out / "incoming").mkdir(parents=True, exist_ok=True)
    (out / "series").mkdir()
    blobs = [path.read_bytes() for path in files]
    started = time.perf_counter()
    for i, blob in enumerate(blobs):
        incoming = IncomingFile(out / "incoming")
        incoming.write(blob)
        incoming.commit(out / "series" / f"{i}.dcm")
    return time.perf_counter() - started


def run_node(files: list[Path], parallel: int, data_dir: Path, processes: int) -> float:
    """The node's intake as ``serve`` builds it, with ``processes`` intake processes on one port."""
    data_dir.mkdir(parents=True, exist_ok=True)
    spec = IntakeSpec(spool_dir=str(data_dir / "spool"), data_dir=str(data_dir), db_path=str(data_dir / "jobs.sqlite"),
                      ae_title="MEDSEG", host="127.0.0.1", port=0, allowed_callers=None, allowed_hosts=None,
                      max_associations=8, min_free_disk_mb=64, max_study_instances=100_000, parent_pid=os.getpid(),
                      log_level=logging.WARNING,
                      reuse_port=processes > 1)  # fmt: skip
    scp = spec.build()
    scp.start()
    pool = None
    try:
        if processes > 1:
            pool = IntakePool(replace(spec, port=scp.port), processes - 1)
            pool.start()
        return send(files, scp.port, "MEDSEG", parallel)
    finally:
        if pool is not None:
            pool.stop()
        scp.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data set (seconds), for tests")
    parser.add_argument("--repeat", type=int, default=2, help="runs per configuration (best is reported)")
    args = parser.parse_args(argv)
    cases = [(20, 128), (50, 64)] if args.quick else [(100, 512), (500, 64)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        for count, size in cases:
            files = make_series(root / f"src{size}", count, size)
            for parallel in (1, 4):
                tag = f"{size}-{parallel}"
                # Best of `repeat` runs each, interleaved, so a burst of load on a shared machine hits all alike.
                times: dict[str, list[float]] = {"peer": [], "bare": [], "node1": [], "node2": [], "floor": []}
                # CPU of the SCPs that run in this process (storescu is a child: not counted), ms per instance.
                cpu: dict[str, list[float]] = {"bare": [], "node1": []}
                for r in range(args.repeat):
                    times["floor"].append(run_fsync_floor(files, root / f"floor{tag}-{r}"))
                    times["peer"].append(run_storescp(files, parallel, root / f"storescp{tag}-{r}"))
                    c0 = _cpu_seconds()
                    times["bare"].append(run_bare_pynetdicom(files, parallel, root / f"bare{tag}-{r}"))
                    c1 = _cpu_seconds()
                    times["node1"].append(run_node(files, parallel, root / f"node1-{tag}-{r}", 1))
                    cpu["bare"].append((c1 - c0) / count * 1e3)
                    cpu["node1"].append((_cpu_seconds() - c1) / count * 1e3)
                    times["node2"].append(run_node(files, parallel, root / f"node2-{tag}-{r}", 2))
                rate = {k: count / min(v) for k, v in times.items()}
                rate.update({f"cpu_{k}": min(v) for k, v in cpu.items()})
                rows.append((f"{count} x {size}²", parallel, rate))
    for _, _, r in rows:
        # storescp's exchange and the durable write, one after the other: what a durable storescp would reach.
        r["bound"] = 1 / (1 / r["peer"] + 1 / r["floor"])
    lines = [
        "| data | associations | DCMTK storescp | pynetdicom, bare | durable writes alone | storescp + durable "
        "write | node, 1 process | node, 2 processes | node/storescp (1 / 2 proc.) | node/(storescp + durable "
        "write) | bare/storescp | CPU ms/instance (bare / node) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {d} | {p} | {r['peer']:.0f} | {r['bare']:.0f} | {r['floor']:.0f} | {r['bound']:.0f} "
            f"| {r['node1']:.0f} | {r['node2']:.0f} | {r['node1'] / r['peer']:.2f} / {r['node2'] / r['peer']:.2f} "
            f"| {r['node1'] / r['bound']:.2f} | {r['bare'] / r['peer']:.2f} "
            f"| {r['cpu_bare']:.1f} / {r['cpu_node1']:.1f} |"
            for d, p, r in rows
        ],
        "",
        f"Instances/s, best of {args.repeat}. `python bench/bench_ingest.py{' --quick' if args.quick else ''}` on "
        f"{os.cpu_count()} cores; sender: DCMTK storescu with TCP_NODELAY=1. storescp (`--fork`) writes without "
        "fsync; *pynetdicom, bare* writes the received bytes with no checks and no fsync; the node checks each "
        "instance, fsyncs it and its directory, and records it in the job store before answering. *Durable writes "
        "alone*: the node's incoming-file/fsync/rename/directory-fsync sequence in a loop with no DICOM (one thread), "
        "the upper bound of any durable receiver on this disk. *storescp + durable write*: 1 / (1/storescp + "
        "1/durable writes), what storescp would reach if it also made each instance durable before answering "
        "(on one association the two happen one after the other). *CPU ms/instance*: CPU time of this process (the "
        "SCP's threads; storescu is a child and not counted) per instance, one process, least of the runs.",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text("# Ingest throughput\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
