"""Several intake processes on one port (``node.intake_processes``), with DCMTK peers.

Real processes and real sockets throughout: the workers are started exactly
as the node starts them, DCMTK ``echoscu``/``storescu`` are the callers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from medsegagent.dicom.part10 import file_meta_header
from medsegagent.node.config import ConfigError, parse_config
from medsegagent.node.intake_pool import IntakePool, IntakeSpec
from medsegagent.node.jobs import JobStore
from tests.conftest import pid_is_alive

ENV = {**os.environ, "TCP_NODELAY": "1"}


def _spec(tmp_path: Path, port: int = 0, **overrides) -> IntakeSpec:
    base = IntakeSpec(
        spool_dir=str(tmp_path / "spool"), data_dir=str(tmp_path), db_path=str(tmp_path / "jobs.sqlite"),
        ae_title="MEDSEG", host="127.0.0.1", port=port, allowed_callers=["MODALITY", "ECHOSCU"], allowed_hosts=None,
        max_associations=8, min_free_disk_mb=1, max_study_instances=10_000, parent_pid=os.getpid(),
    )  # fmt: skip
    return replace(base, **overrides)


@pytest.fixture
def pool_factory(tmp_path):
    started: list[tuple] = []

    def make(workers: int = 1):
        spec = _spec(tmp_path)
        scp = spec.build()
        scp.start()
        pool = IntakePool(replace(spec, port=scp.port), workers)
        started.append((scp, pool))
        pool.start()
        return scp, pool

    yield make
    for scp, pool in started:
        pool.stop()
        scp.stop()


def test_associations_are_spread_over_processes_that_share_one_port(pool_factory, capfd, caplog):
    caplog.set_level("INFO", logger="medsegagent.dicom.association")
    scp, pool = pool_factory(workers=1)
    (worker,) = pool.pids
    for _ in range(16):  # the kernel hashes each connection to one socket: 16 all on one side has p = 2**-15
        result = subprocess.run(["/usr/bin/echoscu", "-aet", "ECHOSCU", "-aec", "MEDSEG", "127.0.0.1", str(scp.port)],
                                env=ENV, capture_output=True, text=True, timeout=30)  # fmt: skip
        assert result.returncode == 0, result.stderr
    time.sleep(0.5)
    worker_log = capfd.readouterr().err
    served_by_worker = worker_log.count(f"accepted by pid {worker}")
    served_by_main = sum(f"accepted by pid {os.getpid()}" in r.getMessage() for r in caplog.records)
    assert served_by_worker > 0 and served_by_main > 0
    assert served_by_worker + served_by_main == 16


def test_every_process_spools_and_records_into_the_one_job_store(pool_factory, phantom_factory, tmp_path):
    scp, _ = pool_factory(workers=1)
    _, files = phantom_factory("CT", seed=3, size=64, slices=24)
    study = files.series["CT"]
    # Four parallel associations, as a modality with several senders would open.
    procs = [
        subprocess.Popen(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "MEDSEG", "127.0.0.1", str(scp.port),
                          *map(str, study[i::4])], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for i in range(4)
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    spooled = list((tmp_path / "spool").rglob("*.dcm"))
    assert len(spooled) == len(study)
    store = JobStore(tmp_path / "jobs.sqlite")
    (study_uid,) = {p.parent.parent.name for p in spooled}
    assert store.study_instances(study_uid) == len(study)


def test_a_worker_that_cannot_bind_stops_the_pool_from_starting(tmp_path):
    with socket.socket() as plain:  # no SO_REUSEPORT: nobody may join this port
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        pool = IntakePool(_spec(tmp_path, port=plain.getsockname()[1]), 1)
        with pytest.raises(RuntimeError, match=r"did not start.*Address already in use"):
            pool.start()
        assert not _intake_children()  # the worker that failed is gone, not left running


def _intake_children() -> list[int]:
    """Live child processes of this test process that run an intake worker."""
    children = set()
    for task in Path("/proc/self/task").iterdir():
        children.update(int(pid) for pid in (task / "children").read_text().split())
    found = []
    for pid in children:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"medsegagent.node.intake_pool" in command and pid_is_alive(pid):
            found.append(pid)
    return found


def test_a_dead_worker_is_replaced(pool_factory):
    scp, pool = pool_factory(workers=1)
    (first,) = pool.pids
    os.kill(first, signal.SIGKILL)
    # The pool's supervisor thread notices (every second) and starts a new process on the same port.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (len(pool.pids) != 1 or first in pool.pids):
        time.sleep(0.1)
    (second,) = pool.pids
    assert second != first
    result = subprocess.run(["/usr/bin/echoscu", "-aet", "ECHOSCU", "-aec", "MEDSEG", "127.0.0.1", str(scp.port)],
                            env=ENV, capture_output=True, timeout=30)  # fmt: skip
    assert result.returncode == 0


def test_a_second_node_on_the_same_data_dir_is_refused(tmp_path):
    from medsegagent.node.service import DataDirInUseError, Node

    config = parse_config({"node": {"port": 0, "data_dir": str(tmp_path / "var"), "min_free_disk_mb": 1},
                           "http": {"enabled": False}})  # fmt: skip
    first, second = Node(config), Node(config)
    first.start()
    try:
        with pytest.raises(DataDirInUseError, match="another node is running"):
            second.start()
        second.stop()
    finally:
        first.stop()
    third = Node(config)  # the lock goes with the node that held it
    third.start()
    third.stop()


def test_workers_die_with_a_killed_parent(tmp_path):
    """``kill -9`` of the node must not leave an intake process holding its port."""
    parent = textwrap.dedent(f"""
        import os, sys, time
        from dataclasses import replace
        from pathlib import Path
        from tests.test_intake_pool import _spec
        from medsegagent.node.intake_pool import IntakePool
        spec = _spec(Path({str(tmp_path)!r}), parent_pid=os.getpid())
        scp = spec.build(); scp.start()
        pool = IntakePool(replace(spec, port=scp.port), 2); pool.start()
        print(" ".join(map(str, pool.pids)), flush=True)
        time.sleep(120)
    """)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    line = proc.stdout.readline()
    workers = [int(p) for p in re.findall(r"\d+", line)]
    assert len(workers) == 2, line
    assert all(pid_is_alive(pid) for pid in workers)
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(pid_is_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_is_alive(pid) for pid in workers)


def test_reconcile_spool_reopens_studies_with_unrecorded_arrivals(tmp_path):
    spool = tmp_path / "spool"

    def spool_file(study: str, i: int) -> Path:
        path = spool / study / "1.2.3.9" / f"1.2.3.9.{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = file_meta_header(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=f"1.2.3.9.{i}",
                                  transfer_syntax_uid="1.2.840.10008.1.2", implementation_class_uid="1.2.3",
                                  source_ae_title="MODALITY", receiving_ae_title="LIVERSEG")  # fmt: skip
        path.write_bytes(header)
        return path

    for i in range(3):
        spool_file("1.2.3.4", i)  # never recorded (power loss)
    store = JobStore(tmp_path / "jobs.sqlite")
    for i in range(2):
        spool_file("1.2.3.5", i)
        time.sleep(0.01)
        store.touch_study("1.2.3.5", "MEDSEG", "MODALITY")  # recorded after the file was in place
    store.touch_study("1.2.3.5", "MEDSEG", "MODALITY")  # a re-send: more arrivals than files is fine
    (spool / "not-a-uid").mkdir()
    assert store.reconcile_spool(spool) == ["1.2.3.4"]
    assert store.study_instances("1.2.3.4") == 3
    jobs = {job.study_uid: job for job in store.close_quiet_studies(0.0)}
    assert (jobs["1.2.3.4"].called_ae, jobs["1.2.3.4"].calling_ae) == ("LIVERSEG", "MODALITY")
    assert store.reconcile_spool(spool) == []  # a normal restart reopens nothing, finished or not
    # An instance that arrived after the last recorded one reopens its study, as a late instance does.
    time.sleep(0.01)
    spool_file("1.2.3.5", 7)
    assert store.reconcile_spool(spool) == ["1.2.3.5"]


def test_intake_processes_must_be_positive():
    with pytest.raises(ConfigError, match=r"node\.intake_processes"):
        parse_config({"node": {"intake_processes": 0}, "http": {"enabled": False}})
    assert parse_config({"node": {"intake_processes": 3}, "http": {"enabled": False}}).node.intake_processes == 3


def test_tls_settings_survive_the_json_trip_to_a_worker(tmp_path):
    from medsegagent.node.config import TlsSettings
    from medsegagent.node.intake_pool import tls_from_json, tls_to_json

    pem, key, ca = (tmp_path / name for name in ("n.pem", "n.key", "ca.pem"))
    for path in (pem, key, ca):
        path.write_text("x")  # the settings name files that exist
    client_checked = {"ca_certificates": ca, "require_client_certificate": True}
    for tls in (TlsSettings(certificate=pem, private_key=key),
                TlsSettings(certificate=pem, private_key=key, **client_checked)):  # fmt: skip
        assert tls_from_json(json.loads(json.dumps(tls_to_json(tls)))) == tls
    assert tls_from_json(tls_to_json(None)) is None
