"""The node's DICOM listener against real DCMTK peers (echoscu, storescu)."""

from __future__ import annotations

import os
import subprocess

import pydicom
import pytest

from medsegagent.node.dispatch import DeliveryError, send_files
from medsegagent.node.intake import StorageSCP
from tests.test_node import _free_port, _wait_port

#: Debian's DCMTK; the venv's pynetdicom apps shadow the names on PATH.
DCMTK = "/usr/bin"
ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(name: str) -> str:
    path = os.path.join(DCMTK, name)
    if not os.access(path, os.X_OK):
        pytest.fail(f"DCMTK {name} missing at {path}; run scripts/bootstrap.sh test")
    return path


@pytest.fixture
def scp(tmp_path):
    node = StorageSCP(tmp_path / "spool", ae_title="MEDSEG", host="127.0.0.1", port=0, allowed_callers={"PACS"})
    node.start()
    yield node
    node.stop()


def test_echo_and_store_with_dcmtk(scp, phantom_factory):
    _, files = phantom_factory("CT")
    echo = subprocess.run(
        [dcmtk("echoscu"), "-aet", "PACS", "-aec", "MEDSEG", "127.0.0.1", str(scp.port)],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert echo.returncode == 0, echo.stderr
    paths = [str(p) for p in files.series["CT"]]
    sent = subprocess.run(
        [dcmtk("storescu"), "-aet", "PACS", "-aec", "MEDSEG", "127.0.0.1", str(scp.port), *paths],
        env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    study = pydicom.dcmread(files.series["CT"][0], stop_before_pixels=True)
    spooled = sorted((scp.spool_dir / study.StudyInstanceUID / study.SeriesInstanceUID).glob("*.dcm"))
    assert len(spooled) == len(files.series["CT"])
    # Bytes on disk decode to the same instances; no temporary files are left.
    assert {pydicom.dcmread(p).SOPInstanceUID for p in spooled} == {
        pydicom.dcmread(p).SOPInstanceUID for p in files.series["CT"]
    }
    assert not list(scp.spool_dir.rglob("*.tmp"))
    # Stored as received: same pixel bytes, File Meta naming the sender and the negotiated syntax.
    original = pydicom.dcmread(files.series["CT"][0])
    stored = pydicom.dcmread(scp.spool_dir / study.StudyInstanceUID / study.SeriesInstanceUID
                             / f"{original.SOPInstanceUID}.dcm")  # fmt: skip
    assert stored.PixelData == original.PixelData
    assert stored.file_meta.SourceApplicationEntityTitle == "PACS"
    assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    negotiable = {original.file_meta.TransferSyntaxUID, pydicom.uid.ImplicitVRLittleEndian}
    assert stored.file_meta.TransferSyntaxUID in negotiable
    assert scp.stats.stored == len(list((scp.spool_dir / study.StudyInstanceUID).rglob("*.dcm")))


def test_unknown_calling_ae_is_rejected(scp):
    echo = subprocess.run(
        [dcmtk("echoscu"), "-aet", "STRANGER", "-aec", "MEDSEG", "127.0.0.1", str(scp.port)],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert echo.returncode != 0
    assert "Calling AE Title Not Recognized" in echo.stderr + echo.stdout


def test_path_like_uid_is_refused_and_node_keeps_serving(scp, phantom_factory, tmp_path):
    _, files = phantom_factory("CT")
    bad = tmp_path / "bad.dcm"
    ds = pydicom.dcmread(files.series["CT"][0])
    ds.StudyInstanceUID = "1.2.3/../../../etc"
    ds.save_as(bad)
    result = subprocess.run(
        [dcmtk("storescu"), "-v", "-aet", "PACS", "-aec", "MEDSEG", "127.0.0.1", str(scp.port), str(bad)],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "Error: CannotUnderstand" in result.stderr
    assert scp.stats.refused == 1
    assert not any(p.name == "etc" for p in scp.spool_dir.rglob("*"))
    # Still serving: a good instance goes through right after.
    assert (
        send_files(files.series["CT"][:2], host="127.0.0.1", port=scp.port, called_ae="MEDSEG", calling_ae="PACS").sent
        == 2
    )


def test_missing_pixel_data_is_refused(scp, phantom_factory, tmp_path):
    _, files = phantom_factory("CT")
    path = tmp_path / "nopixels.dcm"
    ds = pydicom.dcmread(files.series["CT"][0])
    del ds.PixelData
    ds.save_as(path)
    result = send_files([path], host="127.0.0.1", port=scp.port, called_ae="MEDSEG", calling_ae="PACS")
    assert result.sent == 0
    assert list(result.failed.values()) == [0xC000]


def test_our_scu_reports_rejection(scp, phantom_factory):
    _, files = phantom_factory("CT")
    with pytest.raises(DeliveryError, match="not accepted"):
        send_files(files.series["CT"][:1], host="127.0.0.1", port=scp.port, called_ae="MEDSEG", calling_ae="NOBODY")


def test_dcmtk_storescp_receives_from_our_scu(phantom_factory, tmp_path):
    """Our SCU against DCMTK's SCP: the delivery path to a PACS."""
    _, files = phantom_factory("CT")
    port = _free_port()
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "PACS", "-od", str(out), str(port)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_port(port)
        result = send_files(files.series["CT"], host="127.0.0.1", port=port, called_ae="PACS")
        assert result.sent == len(files.series["CT"])
        assert len(list(out.iterdir())) == len(files.series["CT"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _make_cert(folder, name: str) -> tuple[str, str]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", f"/CN={name}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(key), str(cert)


def test_dicom_over_tls_with_dcmtk(tmp_path, phantom_factory):
    """Optional TLS: DCMTK echoscu/storescu with +tls reach the node; plain TCP does not."""
    from medsegagent.node.config import TlsSettings
    from medsegagent.node.service import server_ssl_context

    node_key, node_cert = _make_cert(tmp_path, "node")
    peer_key, peer_cert = _make_cert(tmp_path, "peer")
    settings = TlsSettings(certificate=node_cert, private_key=node_key, ca_certificates=peer_cert,
                           require_client_certificate=True)  # fmt: skip
    context = server_ssl_context(settings)
    node = StorageSCP(tmp_path / "spool", ae_title="MEDSEG", host="127.0.0.1", port=0, ssl_context=context)
    node.start()
    try:
        tls = ["+tls", peer_key, peer_cert, "+cf", node_cert]
        echo = subprocess.run([dcmtk("echoscu"), *tls, "-aec", "MEDSEG", "127.0.0.1", str(node.port)],
                              env=ENV, capture_output=True, text=True, timeout=30)  # fmt: skip
        assert echo.returncode == 0, echo.stderr
        _, files = phantom_factory("CT")
        target = [*tls, "-aec", "MEDSEG", "127.0.0.1", str(node.port), str(files.series["CT"][0])]
        sent = subprocess.run([dcmtk("storescu"), *target], env=ENV, capture_output=True, text=True, timeout=30)
        assert sent.returncode == 0, sent.stderr
        assert len(list(node.spool_dir.rglob("*.dcm"))) == 1
        plain = subprocess.run([dcmtk("echoscu"), "-aec", "MEDSEG", "127.0.0.1", str(node.port)],
                               env=ENV, capture_output=True, text=True, timeout=30)  # fmt: skip
        assert plain.returncode != 0
    finally:
        node.stop()


# -- the spool under stress: directories removed under a running node, a full disk ------------------------


def _send(scp, paths) -> list[int]:
    """C-STORE statuses of ``paths`` sent on one association."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="MEDSEG")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


def test_series_and_incoming_directories_removed_while_running_are_made_again(scp, phantom_factory):
    """A spool clean-up that removes a study (or .incoming) does not make the node refuse that series later."""
    import shutil

    _, files = phantom_factory("CT")
    first, *rest = files.series["CT"][:4]
    assert _send(scp, [first]) == [0]
    study_dir = next(p for p in scp.spool_dir.iterdir() if not p.name.startswith("."))
    shutil.rmtree(study_dir)
    shutil.rmtree(scp.spool_dir / ".incoming")
    assert _send(scp, rest) == [0, 0, 0]
    assert len(list(study_dir.rglob("*.dcm"))) == 3


def test_a_write_error_on_the_spool_refuses_the_instance_and_leaks_nothing(scp, phantom_factory, monkeypatch):
    """ENOSPC on the header or on the data: Out of Resources, no file left in .incoming, no descriptor leaked."""
    import errno

    from medsegagent.node import spool

    _, files = phantom_factory("CT")
    original = spool.IncomingFile.write
    for failing_call in (1, 2):  # the File Meta header, then the first data fragment

        def write(self, data, _calls=[0], _fail=failing_call):  # noqa: B006 -- a counter per scenario
            _calls[0] += 1
            if _calls[0] == _fail:
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(self, data)

        monkeypatch.setattr(spool.IncomingFile, "write", write)
        descriptors = len(os.listdir("/proc/self/fd"))
        assert _send(scp, files.series["CT"][:1]) == [0xA700]
        assert not list((scp.spool_dir / ".incoming").iterdir())
        assert len(os.listdir("/proc/self/fd")) <= descriptors
    monkeypatch.setattr(spool.IncomingFile, "write", original)
    assert _send(scp, files.series["CT"][:1]) == [0]
