"""A real Orthanc for the tests, started by ``orthanc/start-orthanc.sh`` and driven by ``orthanc-api-client``.

:class:`OrthancProcess` renders the shipped ``orthanc/orthanc.json`` (or a
base configuration the test gives) with free loopback ports and a throw-away
storage folder, starts Orthanc, waits until it answers and, if asked, until
given plugins are loaded, and stops it by its own pid.  Its ``client`` is an
:class:`orthanc_api_client.OrthancApiClient`; :func:`answer` turns a REST
call into ``(status, body)`` for tests that expect refusals.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import requests
from orthanc_api_client import OrthancApiClient
from orthanc_api_client.exceptions import HttpError, OrthancApiException

ROOT = Path(__file__).resolve().parents[1]
ORTHANC_DIR = ROOT / "orthanc"
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answer(call: Callable[[], requests.Response]) -> tuple[int, Any]:
    """``(HTTP status, JSON body or bytes)`` of an ``OrthancApiClient`` call; HTTP errors are answers too."""
    try:
        response = call()
    except HttpError as exc:
        response = exc.request_response
        if response is None:  # 401/404/409: the client keeps only the status
            return int(exc.http_status_code), None
    kind = response.headers.get("Content-Type", "")
    return response.status_code, response.json() if "json" in kind else response.content


class OrthancProcess:
    """One Orthanc on free loopback ports.

    Parameters
    ----------
    root : Path
        Folder for its storage, rendered configuration and log.
    env : dict, optional
        Extra environment for ``start-orthanc.sh`` (``MEDSEG_*``, ``ORTHANC_*`` overrides).
    config : dict, optional
        A base configuration instead of the shipped ``orthanc/orthanc.json``.
    extra_config : dict, optional
        Merged last into the configuration (``ORTHANC_EXTRA_CONFIG``).
    plugins : iterable of str
        Plugin names (as ``GET /plugins`` lists them) to wait for.
    user, password : str, optional
        HTTP basic credentials of the client (for a configuration with ``AuthenticationEnabled``).
    """

    def __init__(self, root: Path, *, env: dict[str, str] | None = None, config: dict[str, Any] | None = None,
                 extra_config: dict[str, Any] | None = None, plugins: Iterable[str] = (), user: str | None = None,
                 password: str | None = None) -> None:  # fmt: skip
        self.root = root
        self.aet = str((config or {}).get("DicomAet", "ORTHANC"))
        self.log_path = root / "orthanc.log"
        self.worklists = root / "worklists"
        self.plugins = tuple(plugins)
        self.env = {**os.environ, "TCP_NODELAY": "1", **(env or {}), "ORTHANC_DATA": str(root),
                    "ORTHANC_STABLE_AGE": "2"}  # fmt: skip
        self._credentials = (user, password)
        self._pick_ports()
        root.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (root / "base.json").write_text(json.dumps(config))
            self.env["ORTHANC_CONFIG"] = str(root / "base.json")
        if extra_config is not None:
            (root / "extra.json").write_text(json.dumps(extra_config))
            self.env["ORTHANC_EXTRA_CONFIG"] = str(root / "extra.json")
        self.proc: subprocess.Popen | None = None

    def _pick_ports(self, *, http_only: bool = False) -> None:
        # (the DICOM port may already be in a node's configuration: only the HTTP port is picked again)
        self.http_port = free_port()
        if not http_only:
            self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.env.update(ORTHANC_HTTP_PORT=str(self.http_port), ORTHANC_DICOM_PORT=str(self.dicom_port))
        self.client = OrthancApiClient(self.url, user=self._credentials[0], pwd=self._credentials[1])

    def start(self, timeout: float = 60, attempts: int = 3) -> OrthancProcess:
        """Start Orthanc and wait until it answers with every plugin asked for loaded.

        An HTTP port that another process took between :func:`free_port` and Orthanc's bind (a node
        started on port 0 may be handed the same one) is a race of the test, not a failure of Orthanc:
        the start is tried again on a new HTTP port, ``attempts`` times in all.
        """
        if shutil.which("Orthanc") is None:
            pytest.fail("Orthanc is not installed; run scripts/bootstrap.sh test (apt package 'orthanc')")
        for _ in range(attempts - 1):
            if self._start(timeout):
                return self
            if "port of the HTTP server is privileged or already in use" not in self.log():
                break
            self._pick_ports(http_only=True)
        if self._start(timeout):
            return self
        pytest.fail(f"Orthanc did not start:\n{self.log()[-3000:]}")

    def _start(self, timeout: float) -> bool:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(ORTHANC_DIR / "start-orthanc.sh")], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                loaded = self.client.get_json("/plugins", timeout=2)
                if all(name in loaded for name in self.plugins):
                    return True
            except OrthancApiException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                return False
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop Orthanc (its own pid), killing it after 20 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.client.close()

    def log(self) -> str:
        """What Orthanc printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def upload(self, files: Iterable[Path]) -> str:
        """POST the files to ``/instances``; the Orthanc id of their (one) study."""
        instances = [i for path in files for i in self.client.upload_file(path)]
        studies = {self.client.instances.get_parent_study_id(i) for i in instances}
        assert len(studies) == 1, studies
        return studies.pop()

    def series(self, study_id: str, modality: str) -> list[dict[str, Any]]:
        """The expanded series of ``study_id`` with this Modality."""
        return [s for s in self.client.get_json(f"/studies/{study_id}/series")
                if s["MainDicomTags"]["Modality"] == modality]  # fmt: skip

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's id of the study with this Study Instance UID, if it holds it."""
        return self.client.studies.lookup(study_uid)

    def instance_file(self, sop_instance_uid: str) -> bytes:
        """The stored file of the one instance with this SOP Instance UID."""
        query = {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}
        found = self.client.post("/tools/find", json=query).json()
        assert len(found) == 1, f"{sop_instance_uid} stored {len(found)} times"
        return self.client.instances.get_file(found[0])
