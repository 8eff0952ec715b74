"""``medsegagent orthanc check`` against a real Orthanc (shipped configuration) and a running node.

The command runs as an administrator runs it (the installed console script,
a node configuration file); one line per check, exit status 0 only when
every check passes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from medsegagent.node.config import load_config
from medsegagent.node.service import Node
from tests.orthanc_helpers import OrthancProcess, free_port

CLI = str(Path(sys.executable).parent / "medsegagent")
CHECKS = ["reachable", "DICOMweb plugin", "MedSegAgent plugin", "node in Orthanc's modalities",
          "Orthanc in the node's peers", "C-ECHO Orthanc -> node", "C-ECHO node -> Orthanc"]  # fmt: skip


def write_config(path: Path, port: int, ae_title: str = "MEDSEG", peer: str = "ORTHANC") -> Path:
    config = {"node": {"ae_title": ae_title, "host": "127.0.0.1", "port": port, "data_dir": str(path.parent / "var"),
                       "min_free_disk_mb": 1},
              "peers": [{"ae_title": peer, "host": "127.0.0.1"}], "http": {"enabled": False}}  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def check(*args: str) -> tuple[int, list[str]]:
    proc = subprocess.run([CLI, "orthanc", "check", *args], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout.splitlines()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[OrthancProcess, Path]]:
    """Orthanc from orthanc/orthanc.json and the node it knows, running; the node's configuration file."""
    root = tmp_path_factory.mktemp("orthanc-check")
    config = write_config(root / "node.yaml", free_port())
    node = Node(load_config(config), poll_seconds=0.1)
    node.start()
    orthanc = OrthancProcess(root / "orthanc", env={"MEDSEG_ROUTING": "off", "MEDSEG_DICOM_PORT": str(node.scp.port)},
                             plugins=("python", "dicom-web"))  # fmt: skip
    try:
        orthanc.start()
        yield orthanc, config
    finally:
        orthanc.stop()
        node.stop()


def test_every_check_passes_when_orthanc_and_the_node_know_each_other(stack):
    orthanc, config = stack
    status, lines = check("--config", str(config), "--url", orthanc.url)
    assert status == 0, lines
    assert [line.split(":")[0] for line in lines] == [f"ok   {name}" for name in CHECKS]
    assert "Orthanc 1.10" in lines[0] and "medseg: MEDSEG@127.0.0.1" in lines[3]


def test_a_node_orthanc_does_not_know_fails_with_what_to_change(stack, tmp_path):
    orthanc, _ = stack
    config = write_config(tmp_path / "other.yaml", free_port(), ae_title="OTHERNODE", peer="SOMEPACS")
    status, lines = check("--config", str(config), "--url", orthanc.url)
    assert status == 1
    by_name = {line[5:].split(":")[0]: line for line in lines}
    assert by_name["reachable"].startswith("ok")
    assert "no DicomModalities entry has AET OTHERNODE" in by_name["node in Orthanc's modalities"]
    assert "ORTHANC is not among SOMEPACS" in by_name["Orthanc in the node's peers"]
    assert by_name["C-ECHO Orthanc -> node"].startswith("FAIL")
    assert by_name["C-ECHO node -> Orthanc"].startswith("ok")  # Orthanc accepts any caller's C-ECHO


def test_unreachable_orthanc_is_one_fail_line(tmp_path):
    status, lines = check("--url", f"http://127.0.0.1:{free_port()}")
    assert status == 1 and len(lines) == 1 and lines[0].startswith("FAIL reachable:"), lines
