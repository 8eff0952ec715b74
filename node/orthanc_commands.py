"""``medsegagent orthanc check``: is this Orthanc wired to this node?

One line per check, ``ok`` or ``FAIL`` with what to change; exit status 0
when every check passes, 1 otherwise.  Orthanc's REST API is reached through
``orthanc-api-client`` (basic authentication from ``$ORTHANC_USERNAME`` and
``$ORTHANC_PASSWORD`` when both are set, as ``orthanc/start-orthanc.sh`` uses
them); the node's own side comes from its configuration file.
"""

from __future__ import annotations

import argparse
import logging
import os
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orthanc_api_client import OrthancApiClient
from orthanc_api_client.exceptions import OrthancApiException
from pynetdicom import evt
from pynetdicom.sop_class import Verification

from medsegagent.node.config import Config, ConfigError, load_config
from medsegagent.node.scu import scu_ae, set_nodelay

#: A route the MedSegAgent Orthanc plugin registers that answers without the node.
PLUGIN_ROUTE = "/medsegagent/ui/segment.html"


@dataclass(frozen=True)
class Check:
    """The result of one check: its name, whether it passed, and what was found (or what to change)."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        """``ok   name: detail`` or ``FAIL name: detail``."""
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``orthanc check`` to the CLI."""
    orthanc = subparsers.add_parser("orthanc", help="check the Orthanc the node works with")
    commands = orthanc.add_subparsers(dest="orthanc_command", metavar="COMMAND")
    commands.required = True
    check = commands.add_parser(
        "check",
        help="reachability, DICOMweb, the MedSegAgent plugin, modalities, C-ECHO each way",
        description="Check that Orthanc and the node know each other; one line per check, exit status 1 on a FAIL.",
    )
    check.add_argument("--config", type=Path, metavar="FILE", help="the node's configuration (default: built-in)")
    check.add_argument("--url", default="http://127.0.0.1:8042", help="Orthanc's REST API (default %(default)s)")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds per request and association")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Print one line per check; 0 when all pass."""
    try:
        config = load_config(args.config) if args.config else Config()
    except ConfigError as exc:
        print(f"FAIL configuration: {exc}")
        return 1
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its connection retries are this command's FAIL line
    user, password = os.environ.get("ORTHANC_USERNAME"), os.environ.get("ORTHANC_PASSWORD")
    client = OrthancApiClient(args.url, user=user, pwd=password)
    results = list(check_orthanc(client, config, args.url, args.timeout))
    for result in results:
        print(result.line(), flush=True)
    return 0 if all(r.ok for r in results) else 1


def check_orthanc(client: OrthancApiClient, config: Config, url: str, timeout: float) -> Iterator[Check]:
    """Every check, in order; the later ones are skipped (a FAIL each) when Orthanc does not answer.

    Parameters
    ----------
    client : OrthancApiClient
        Orthanc's REST API.
    config : Config
        The node's configuration (its AE title, port and peers).
    url : str
        The same URL as ``client``'s (its host is where the node sends its C-ECHO).
    timeout : float
        Seconds per request and association.
    """
    try:
        system = client.get_json("/system", timeout=timeout)
    except OrthancApiException as exc:
        yield Check("reachable", False, f"{url} does not answer: {exc.msg}")
        return
    yield Check("reachable", True, f"{url}: Orthanc {system.get('Version')}, AE {system.get('DicomAet')}, "
                                   f"DICOM port {system.get('DicomPort')}")  # fmt: skip
    plugins = _answer(lambda: client.get_json("/plugins", timeout=timeout)) or []
    yield _dicomweb(client, plugins, timeout)
    yield _plugin(client, plugins, timeout)
    node = config.node
    modalities = _answer(lambda: client.get_json("/modalities?expand", timeout=timeout)) or {}
    alias = next((name for name, m in modalities.items() if m.get("AET") == node.ae_title), None)
    yield _node_modality(alias, modalities, config)
    peers = {p.ae_title for p in config.peers}
    orthanc_ae = str(system.get("DicomAet", ""))
    if not peers:
        yield Check("Orthanc in the node's peers", True, "peers is empty: the node accepts any calling AE title")
    else:
        among = f"among {', '.join(sorted(peers))}"
        known = orthanc_ae in peers
        yield Check("Orthanc in the node's peers", known, f"{orthanc_ae} is {among}" if known else
                    f"{orthanc_ae} is not {among}: add it, or Orthanc cannot send to the node")  # fmt: skip
    yield _echo_from_orthanc(client, alias, timeout)
    host = urllib.parse.urlsplit(url).hostname or "127.0.0.1"
    yield _echo_to_orthanc(node.ae_title, orthanc_ae, host, int(system.get("DicomPort", 4242)), timeout)


def _answer(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except OrthancApiException:
        return None


def _dicomweb(client: OrthancApiClient, plugins: list[str], timeout: float) -> Check:
    if "dicom-web" not in plugins:
        return Check("DICOMweb plugin", False, "not loaded: install orthanc-dicomweb and list it under Plugins")
    if _answer(lambda: client.get("/dicom-web/studies?limit=1", timeout=timeout)) is None:
        return Check("DICOMweb plugin", False, "loaded, but /dicom-web/studies does not answer (DicomWeb.Root?)")
    return Check("DICOMweb plugin", True, "QIDO-RS answers at /dicom-web/")


def _plugin(client: OrthancApiClient, plugins: list[str], timeout: float) -> Check:
    if "python" not in plugins:
        return Check("MedSegAgent plugin", False, "Orthanc's Python plugin is not loaded (orthanc-python)")
    if _answer(lambda: client.get(PLUGIN_ROUTE, timeout=timeout)) is None:
        return Check("MedSegAgent plugin", False, f"{PLUGIN_ROUTE} does not answer: is PythonScript "
                                                  "orthanc/medsegagent_plugin.py?")  # fmt: skip
    return Check("MedSegAgent plugin", True, f"{PLUGIN_ROUTE} answers")


def _node_modality(alias: str | None, modalities: dict[str, Any], config: Config) -> Check:
    node = config.node
    wanted = f'{{"AET": "{node.ae_title}", "Host": "{node.host}", "Port": {node.port}}}'
    if alias is None:
        return Check("node in Orthanc's modalities", False,
                     f"no DicomModalities entry has AET {node.ae_title}: add one such as {wanted}")  # fmt: skip
    entry = modalities[alias]
    if int(entry.get("Port", 0)) != node.port:
        return Check("node in Orthanc's modalities", False,
                     f"{alias} points to port {entry.get('Port')}, the node listens on {node.port}")  # fmt: skip
    return Check("node in Orthanc's modalities", True, f"{alias}: {node.ae_title}@{entry.get('Host')}:{node.port}")


def _echo_from_orthanc(client: OrthancApiClient, alias: str | None, timeout: float) -> Check:
    if alias is None:
        return Check("C-ECHO Orthanc -> node", False, "skipped: Orthanc has no modality for the node")
    try:
        client.post(f"/modalities/{alias}/echo", json={"Timeout": int(max(timeout, 1))}, timeout=timeout + 5)
    except OrthancApiException as exc:
        return Check("C-ECHO Orthanc -> node", False, f"{alias} did not answer ({exc.msg}): is the node running?")
    return Check("C-ECHO Orthanc -> node", True, f"{alias} answered")


def _echo_to_orthanc(node_ae: str, orthanc_ae: str, host: str, port: int, timeout: float) -> Check:
    name = "C-ECHO node -> Orthanc"
    ae = scu_ae(node_ae, timeout)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=orthanc_ae, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "did not answer"
        return Check(name, False, f"{orthanc_ae}@{host}:{port} {why}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    ok = bool(status) and int(status.Status) == 0
    return Check(name, ok, f"{orthanc_ae}@{host}:{port} " + ("answered" if ok else "sent no success status"))
