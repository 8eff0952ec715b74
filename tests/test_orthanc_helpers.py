"""The test helper that starts a real Orthanc survives a port race (tests/orthanc_helpers.py)."""

from __future__ import annotations

import socket

from tests.orthanc_helpers import OrthancProcess


def test_a_taken_http_port_is_picked_again(tmp_path):
    # A node started on port 0 may be handed the port free_port() had just released to Orthanc.
    config = {"DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": []}
    orthanc = OrthancProcess(tmp_path / "orthanc", config=config)
    taken = orthanc.http_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        orthanc.start()
        try:
            assert orthanc.http_port != taken
            assert orthanc.client.get_json("/system")["DicomAet"] == "ORTHANC"
        finally:
            orthanc.stop()
