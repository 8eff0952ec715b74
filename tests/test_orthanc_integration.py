"""Orthanc + node: auto-routing rules, the REST route, the worklist — against the real things.

Orthanc (Debian 1.10 with the Python, DICOMweb and worklist plugins) starts
through ``orthanc/start-orthanc.sh`` with the shipped ``orthanc/orthanc.json``;
the node runs in-process from the shipped ``orthanc/node.yaml``; only ports,
folders, StableAge and the quiet time differ (free loopback ports, throw-away
folders).  A phantom CT study goes into Orthanc by REST, and its SEG must come
back into the same Orthanc study, valid for dciodvfy, for each path:

* rule (Python engine): the shipped CT abdomen rule sends to the preset AE;
* rule (Lua engine): a rule with a ``Request`` adds a request SR;
* REST route ``POST /medsegagent/segment``: request SR + send, job status proxied;
* worklist: the rule routes, the request comes from Orthanc's worklist plugin.

The first tests check the plugin's pure functions (no Orthanc needed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from medsegagent.node.config import ConfigError, expand_environment, load_config, parse_config
from medsegagent.node.jobs import Job
from medsegagent.node.service import Node
from tests import conftest
from tests.conftest import dciodvfy_errors
from tests.orthanc_helpers import ORTHANC_DIR, PYTHON_PLUGIN, OrthancProcess, answer
from tests.orthanc_helpers import ROOT as ROOT  # test_orthanc_browser and test_ohif import it from here

TOKEN = "orthanc-integration-token"
DEMO_LABELS = {"Liver", "Spleen", "Kidney, right", "Kidney, left", "Pancreas", "Aorta"}  # as the SEG names them


def _load_plugin():
    spec = importlib.util.spec_from_file_location("medsegagent_plugin", ORTHANC_DIR / "medsegagent_plugin.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


plugin = _load_plugin()


# -- the plugin's pure functions -----------------------------------------------------------------


def _series(sid: str, n: int = 3, **tags: str) -> dict[str, Any]:
    return {"ID": sid, "MainDicomTags": tags, "Instances": [f"{sid}-{i}" for i in range(n)]}


def test_glob_match_wildcards_alternatives_case():
    assert plugin.glob_match(None, "anything")
    assert plugin.glob_match("*ABD*|*LIVER*", "ct abdomen with contrast")
    assert plugin.glob_match("HEAD*|NECK", "neck")
    assert plugin.glob_match("CT?", "CT1") and not plugin.glob_match("CT?", "CT12")
    assert not plugin.glob_match("ABDOMEN", "")
    assert plugin.glob_match("*", "")
    # Regex characters are literal, as in the Lua script.
    assert plugin.glob_match("*H&N*", "RT PLAN H&N") and not plugin.glob_match("A.C", "ABC")


def test_shipped_rules_pick_the_protocol_and_skip_node_output():
    config = json.loads((ORTHANC_DIR / "orthanc.json").read_text())
    settings = plugin.parse_settings(config)
    assert settings.problems == () and len(settings.rules) == 3
    ct = _series("ct", Modality="CT", BodyPartExamined="ABDOMEN", StationName="CT1", Manufacturer="ACME")
    seg = _series("seg", 1, Modality="SEG", Manufacturer="MedSegAgent")
    node_sr = _series("sr", 1, Modality="SR", Manufacturer="MedSegAgent")
    rule, hits = plugin.choose_rule(settings.rules, {"StudyDescription": "CT ABDOMEN W CON"}, [ct, seg, node_sr])
    assert (rule.name, rule.send_to) == ("ct-abdomen-organ-volumetry", "medseg-ctabdvol")
    assert [s["ID"] for s in hits] == ["ct"]
    mr = _series("mr", Modality="MR", BodyPartExamined="BRAIN")
    rule, _ = plugin.choose_rule(settings.rules, {"StudyDescription": "MRI BRAIN TUMOUR FOLLOW-UP"}, [mr])
    assert rule.name == "brain-mr-tumour" and rule.request.startswith("brain tumour")
    hn = _series("hn", Modality="CT", BodyPartExamined="HEADNECK", StationName="RTCT01")
    rule, _ = plugin.choose_rule(settings.rules, {"StudyDescription": "RT PLANNING H&N"}, [hn])
    assert rule.name == "head-neck-ct-organs-at-risk"
    other_station = _series("hn2", Modality="CT", BodyPartExamined="HEADNECK", StationName="CT1")
    assert plugin.choose_rule(settings.rules, {"StudyDescription": "RT PLANNING H&N"}, [other_station]) is None
    # A study holding only the node's output matches nothing, whatever the rule.
    assert plugin.choose_rule(settings.rules, {"StudyDescription": "CT ABDOMEN"}, [seg, node_sr]) is None


def test_loop_guard_and_request_checks():
    # Phantom images carry Manufacturer MedSegAgent too: images are never node output.
    assert not plugin.is_node_output({"Modality": "CT", "Manufacturer": "MedSegAgent"})
    assert plugin.is_node_output({"Modality": "SEG", "Manufacturer": "ACME"})
    assert plugin.is_node_output({"Modality": "OT", "Manufacturer": "MedSegAgent"})
    series = [_series("a", 3), _series("b", 2)]
    assert plugin.already_sent({"a": 3, "b": 2}, series)
    assert not plugin.already_sent({"a": 3, "b": 1}, series)  # a late instance: route again
    assert not plugin.already_sent({}, [])
    assert plugin.parse_routed('{"series": {"a": 3, "b": "x", "c": "4"}}') == {"a": 3, "c": 4}
    assert plugin.parse_routed("not json") == {}
    assert plugin.request_problem("liver and spleen") is None
    for bad in ("", "   ", None, 3, "x" * 1025, "liver\x00", "a\nb"):
        assert plugin.request_problem(bad), bad
    numbered = [_series("a", SeriesNumber="3"), _series("b", SeriesNumber="x"), {}]
    body = plugin.request_sr_body("s", "spleen", plugin.next_series_number(numbered))
    assert body["Tags"]["SeriesNumber"] == "4"  # its own series, above the study's
    assert body["Tags"]["ContentSequence"][0]["TextValue"] == "spleen"
    assert body["Tags"]["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.11"


def test_settings_report_bad_rules_and_urls():
    settings = plugin.parse_settings(
        {
            "MedSegAgent": {
                "NodeUrl": "file:///etc/passwd",
                "AutoRouting": "perl",
                "Rules": [{"Name": "x", "Colour": "red"}, {"Name": "y", "Modality": ""}, "z", {"Modality": "CT"}],
            }
        }
    )
    assert [r.name for r in settings.rules] == ["rule-4"]
    assert settings.node_url == "" and settings.auto_routing == "off"
    assert len(settings.problems) == 5


def test_rules_are_checked_against_the_node_before_they_route():
    settings = plugin.parse_settings(json.loads((ORTHANC_DIR / "orthanc.json").read_text()))
    abdomen, brain, head_neck = settings.rules
    # What each shipped rule asks the node: its preset's Called AE title, or its request SR's text.
    assert plugin.plan_query(settings, abdomen) == {"called_ae": "CTABDVOL", "modality": "CT"}
    assert plugin.plan_query(settings, brain) == {"request": brain.request, "modality": "MR"}
    assert plugin.plan_query(settings, plugin.Rule("tags", modality="CT|MR")) is None  # request only in the study
    runnable = plugin.rule_check({"runnable": True, "missing_models": ["LiTS"], "unmatched": []})
    missing = plugin.rule_check({"runnable": False, "missing_models": ["BraTS21", "a", "b", "c"], "unmatched": []})
    nothing = plugin.rule_check({"runnable": False, "missing_models": [], "unmatched": ["no label for 'x'"]})
    assert runnable == plugin.RuleCheck(True)
    assert missing.reason == "no installed model for BraTS21, a, b and 1 more"
    assert nothing.reason == "the request selects nothing on the node (no label for 'x')"
    checker = plugin.RuleChecker()
    checker._checks.update({abdomen.name: runnable, brain.name: missing})
    forced = plugin.Rule(brain.name, force=True)
    assert checker.blocked(abdomen) is None and checker.blocked(head_neck) is None  # not judged yet: routes
    assert checker.blocked(brain) == missing.reason and checker.blocked(forced) is None
    config = {"MedSegAgent": {"Rules": [{"Name": "f", "Force": "yes"}]}, "ServeFolders": {}}
    assert plugin.parse_settings(config).problems and not plugin.parse_settings(config).rules


def test_status_records_and_ohif_settings():
    record = plugin.status_record("failed", "no usable request", job="j1", rule=None)
    assert plugin.parse_status(json.dumps(record)) == record and "rule" not in record
    assert plugin.parse_status(None) is None and plugin.parse_status("[1]") is None and plugin.parse_status("{") is None
    jobs = [{"id": "new"}, {"id": "old"}]
    assert plugin.new_job(jobs, ["old"]) == {"id": "new"} and plugin.new_job(jobs, ["new", "old"]) is None
    served = plugin.parse_settings({"MedSegAgent": {"OhifRoot": "/ohif/"}, "ServeFolders": {"/ohif": "/srv/ohif"}})
    assert (served.ohif_root, served.ohif_folder) == ("/ohif/", "/srv/ohif")
    not_served = {"MedSegAgent": {"OhifRoot": "/ohif/"}}
    for bad in (not_served, {"MedSegAgent": {"OhifRoot": "/../"}, "ServeFolders": {"/..": "/"}}):
        settings = plugin.parse_settings(bad)
        assert settings.ohif_root is None and "OhifRoot" in settings.problems[0]


def test_node_yaml_takes_the_start_scripts_ports_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSEG_DICOM_PORT", "11199")
    monkeypatch.setenv("MEDSEG_HTTP_PORT", "8099")
    monkeypatch.setenv("ORTHANC_DICOM_PORT", "4299")
    monkeypatch.setenv("ORTHANC_AET", "PACS1")
    monkeypatch.setenv("MEDSEG_AET", "")  # empty counts as unset, as with the shell's ${VAR:-default}
    config = load_config(ORTHANC_DIR / "node.yaml")
    assert (config.node.port, config.http.port, config.node.ae_title) == (11199, 8099, "MEDSEG")
    assert (config.destinations[0].ae_title, config.destinations[0].port) == ("PACS1", 4299)
    assert (config.worklist.ae_title, config.worklist.port, config.peers[0].ae_title) == ("PACS1", 4299, "PACS1")
    with pytest.raises(ConfigError, match="MEDSEG_NOPE not set and no default"):
        expand_environment({"node": {"port": "${MEDSEG_NOPE}"}}, environ={})
    assert expand_environment({"a": "${X:-INF}", "b": "x${X:-1}", "${K}": 1}, environ={}) == {"a": "INF", "b": "x1",
                                                                                           "${K}": 1}  # fmt: skip
    # The start script derives the node's API address from the same MEDSEG_HTTP_PORT (cat shows what it renders).
    env = {**os.environ, "ORTHANC_BIN": "cat", "OHIF_DIST": "none", "ORTHANC_DATA": str(tmp_path),
           "MEDSEG_HTTP_PORT": "8099"}  # fmt: skip
    rendered = subprocess.run([str(ORTHANC_DIR / "start-orthanc.sh")], env=env, capture_output=True, text=True,
                              check=True, timeout=30)  # fmt: skip
    assert json.loads(rendered.stdout)["MedSegAgent"]["NodeUrl"] == "http://127.0.0.1:8099"


def test_port_clash_names_the_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = parse_config({"node": {"port": port, "data_dir": str(tmp_path)}, "http": {"enabled": False}})
        node = Node(config)
        try:
            with pytest.raises(OSError, match=rf"cannot listen for DICOM on 127\.0\.0\.1:{port} \(node\.port\)"):
                node.start()
        finally:
            node.stop()


# -- the real stack -------------------------------------------------------------------------------


class Orthanc(OrthancProcess):
    """The shipped Orthanc (Python, DICOMweb and worklist plugins) with the REST helpers of the stack tests."""

    def __init__(self, root: Path, env: dict[str, str], extra_config: dict[str, Any] | None = None) -> None:
        super().__init__(root, env=env, extra_config=extra_config, plugins=("python",))

    def start(self, timeout: float = 60) -> Orthanc:
        if not PYTHON_PLUGIN.exists():
            pytest.fail("Orthanc's Python plugin is not installed; run scripts/bootstrap.sh test (orthanc-python)")
        super().start(timeout)
        return self

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        """``(status, parsed JSON or bytes)``; HTTP errors are answers, not exceptions."""
        headers = {"Content-Type": content_type} if body is not None else None
        call = getattr(self.client, method.lower())
        return answer(lambda: call(path, data=body, headers=headers, timeout=120))

    def get_json(self, path: str) -> Any:
        return self.client.get_json(path, timeout=120)

    def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        return answer(lambda: self.client.post(path, json=body, timeout=120))


@dataclass
class Stack:
    """A running Orthanc and the node it routes to."""

    orthanc: Orthanc
    node: Node
    root: Path

    def jobs(self, study_uid: str) -> list[Job]:
        return [j for j in self.node.store.list(limit=1000) if j.study_uid == study_uid]


def start_stack(root: Path, routing: str, extra_config: dict[str, Any] | None = None) -> Stack:
    """The node from ``orthanc/node.yaml`` and Orthanc from ``orthanc/orthanc.json``, wired on loopback."""
    orthanc = Orthanc(root / "orthanc", {"MEDSEG_TOKEN": TOKEN, "MEDSEG_ROUTING": routing}, extra_config)
    # Ports through the variables node.yaml shares with start-orthanc.sh (0: any free port).
    ports = {"MEDSEG_DICOM_PORT": "0", "MEDSEG_HTTP_PORT": "0", "ORTHANC_DICOM_PORT": str(orthanc.dicom_port)}
    settings = expand_environment(yaml.safe_load((ORTHANC_DIR / "node.yaml").read_text()), environ=ports)
    settings["node"].update(data_dir=str(root / "node"), quiet_seconds=1.0, collection="demo", min_free_disk_mb=1)
    node = Node(parse_config(settings, ORTHANC_DIR / "node.yaml"), poll_seconds=0.1)
    with pytest.MonkeyPatch.context() as patch:  # the node reads its token (node.yaml: MEDSEG_TOKEN) at start
        patch.setenv("MEDSEG_TOKEN", TOKEN)
        node.start()
    orthanc.env.update(MEDSEG_DICOM_PORT=str(node.scp.port), MEDSEG_URL=f"http://127.0.0.1:{node.http_port}")
    try:
        orthanc.start()
    except BaseException:
        node.stop()
        raise
    return Stack(orthanc, node, root)


def stop_stack(stack: Stack) -> None:
    stack.orthanc.stop()
    stack.node.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """Orthanc with the Python routing engine (the default) and its node."""
    running = start_stack(tmp_path_factory.mktemp("stack-python"), "python")
    yield running
    stop_stack(running)


def fresh_study(files: list[Path], dest: Path, **tags: str) -> list[Path]:
    """A copy of a phantom study with new UIDs and Accession Number (each test owns its study)."""
    dest.mkdir(parents=True)
    study_uid, series_uid, accession = generate_uid(), generate_uid(), f"ACC{time.time_ns() % 10**12}"
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.AccessionNumber = study_uid, series_uid, accession
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(dest / path.name)
        out.append(dest / path.name)
    return out


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, stack: Stack | None = None) -> Any:
    """:func:`tests.conftest.wait_for`; a failure shows the stack's jobs and the end of Orthanc's log."""

    def detail() -> str:
        if stack is None:
            return ""
        jobs = [(j.id[:8], j.state.value, j.request_source, j.error) for j in stack.node.store.list()]
        return f"\njobs: {jobs}\northanc log:\n{stack.orthanc.log()[-3000:]}"

    return conftest.wait_for(predicate, timeout, what, interval=0.25, detail=detail)


def assert_valid_seg_in_study(stack: Stack, study_id: str, tmp_path: Path) -> pydicom.Dataset:
    """Exactly one SEG series with one instance in ``study_id``, clean for dciodvfy; its data set."""
    segs = wait_for(lambda: stack.orthanc.series(study_id, "SEG"), 180, "the SEG in Orthanc", stack)
    assert len(segs) == 1 and len(segs[0]["Instances"]) == 1, segs
    status, raw = stack.orthanc.request("GET", f"/instances/{segs[0]['Instances'][0]}/file")
    assert status == 200
    path = tmp_path / "seg.dcm"
    path.write_bytes(raw)
    assert dciodvfy_errors(path) == []
    seg = pydicom.dcmread(path)
    study = stack.orthanc.get_json(f"/studies/{study_id}")
    assert seg.StudyInstanceUID == study["MainDicomTags"]["StudyInstanceUID"]
    return seg


def request_srs(stack: Stack, study_id: str) -> list[pydicom.Dataset]:
    out = []
    for series in stack.orthanc.series(study_id, "SR"):
        for instance in series["Instances"]:
            _, raw = stack.orthanc.request("GET", f"/instances/{instance}/file")
            out.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw)))
    return [ds for ds in out if ds.get("Manufacturer") == plugin.REQUEST_MANUFACTURER]


def wait_for_log(stack: Stack, pattern: str, timeout: float = 30) -> None:
    wait_for(lambda: re.search(pattern, stack.orthanc.log()), timeout, f"{pattern!r} in Orthanc's log", stack)


@pytest.mark.slow
def test_rule_routes_study_and_seg_comes_back_once(stack, phantom_factory, tmp_path):
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    study = stack.orthanc.upload(fresh_study(files.series["CT"], tmp_path / "abdomen"))
    # A study no rule matches, uploaded alongside: it must stay in Orthanc.
    other = stack.orthanc.upload(fresh_study(files.series["CT"], tmp_path / "other", StudyDescription="RESEARCH"))
    seg = assert_valid_seg_in_study(stack, study, tmp_path)
    assert {s.SegmentLabel for s in seg.SegmentSequence} == DEMO_LABELS  # the CTABDVOL preset
    uid = seg.StudyInstanceUID
    [job] = stack.jobs(uid)
    assert (job.request_source, job.called_ae, job.calling_ae) == ("preset", "CTABDVOL", "ORTHANC")
    # The SEG made the study stable again: the guard skips it, the node sees no second job.
    wait_for_log(stack, rf"stable study {study}: already routed \(rule ct-abdomen-organ-volumetry\)")
    wait_for_log(stack, rf"stable study {other}: no rule matches")
    assert len(stack.jobs(uid)) == 1 and len(stack.orthanc.series(study, "SEG")) == 1
    other_uid = stack.orthanc.get_json(f"/studies/{other}")["MainDicomTags"]["StudyInstanceUID"]
    assert not (stack.node.spool_dir / other_uid).exists()


@pytest.mark.slow
def test_rest_route_writes_request_sr_and_proxies_job_status(stack, phantom_factory, tmp_path):
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    study = stack.orthanc.upload(fresh_study(files.series["CT"], tmp_path / "study", StudyDescription="RESEARCH"))
    orthanc = stack.orthanc
    # Refusals: bad id, unknown study, not JSON, control characters, wrong method.
    assert orthanc.post_json("/medsegagent/segment", {"study": "../studies", "request": "spleen"})[0] == 400
    unknown = "0" * 8 + "-00000000" * 4
    assert orthanc.post_json("/medsegagent/segment", {"study": unknown, "request": "spleen"})[0] == 404
    body = json.dumps({"study": study, "request": "spleen"}).encode()
    assert orthanc.request("POST", "/medsegagent/segment", body, "text/plain")[0] == 415
    assert orthanc.post_json("/medsegagent/segment", {"study": study, "request": "spleen\x07"})[0] == 400
    assert orthanc.request("GET", "/medsegagent/segment")[0] == 405
    assert orthanc.request("GET", "/medsegagent/jobs/" + "0" * 32)[0] == 404
    status, answer = orthanc.post_json("/medsegagent/segment", {"study": study, "request": "spleen"})
    assert status == 200, answer
    assert answer["known_jobs"] == [] and answer["status"] == f"/medsegagent/studies/{study}/jobs"
    seg = assert_valid_seg_in_study(stack, study, tmp_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Spleen"]
    # The request is archived in the study as a valid Basic Text SR.
    [sr] = request_srs(stack, study)
    assert sr.ContentSequence[0].TextValue == "spleen"
    sr.save_as(tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    # Job status through Orthanc; the node's token never leaves Orthanc.
    jobs = wait_for(lambda: [j for j in orthanc.get_json(answer["status"])["jobs"] if j["state"] == "delivered"],
                    30, "the delivered job", stack)  # fmt: skip
    assert jobs[0]["request"] == {"text": "spleen", "source": "sr"}
    status, detail = orthanc.request("GET", f"/medsegagent/jobs/{jobs[0]['id']}")
    assert status == 200 and detail["deliveries"][0]["state"] == "sent"
    assert TOKEN not in json.dumps(detail) + json.dumps(answer)


@pytest.mark.slow
def test_worklist_request_from_orthanc_worklist_plugin(stack, phantom_factory, tmp_path):
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    study_files = fresh_study(files.series["CT"], tmp_path / "study")
    header = pydicom.dcmread(study_files[0], stop_before_pixels=True)
    # The worked example of docs/orthanc.md, for this study's accession number and patient.
    dump = (ORTHANC_DIR / "worklists" / "ct-abdomen-spleen-volumetry.dump").read_text()
    for example, value in (("ACC-2024-0001", header.AccessionNumber), ("DOE^JANE", header.PatientName),
                           ("PAT0001", header.PatientID)):  # fmt: skip
        dump = dump.replace(f"[{example}]", f"[{value}]")
    (tmp_path / "item.dump").write_text(dump)
    accession = str(header.AccessionNumber)
    subprocess.run(["/usr/bin/dump2dcm", "-g", "+te", str(tmp_path / "item.dump"),
                    str(stack.orthanc.worklists / f"{accession}.wl")], check=True, timeout=30)  # fmt: skip
    study = stack.orthanc.upload(study_files)
    seg = assert_valid_seg_in_study(stack, study, tmp_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Spleen"]
    [job] = stack.jobs(seg.StudyInstanceUID)
    # Routed by the CT abdomen rule to the preset AE, but the worklist comes first in node.yaml.
    assert (job.request_source, job.request_text, job.called_ae) == ("worklist", "spleen volumetry", "CTABDVOL")


@pytest.mark.slow
def test_lua_rule_adds_request_sr(phantom_factory, tmp_path):
    rule = {"Name": "ct-abdomen-spleen", "Modality": "CT", "BodyPart": "ABDOMEN", "StudyDescription": "*ABDOMEN*",
            "Request": "spleen"}  # fmt: skip
    lua = start_stack(tmp_path / "stack", "lua", {"MedSegAgent": {"Rules": [rule]}})
    try:
        _, files = phantom_factory("CT", seed=2, size=96, slices=32)
        study = lua.orthanc.upload(fresh_study(files.series["CT"], tmp_path / "study"))
        seg = assert_valid_seg_in_study(lua, study, tmp_path)
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Spleen"]
        [job] = lua.jobs(seg.StudyInstanceUID)
        assert (job.request_source, job.called_ae) == ("sr", "MEDSEG")
        [sr] = request_srs(lua, study)
        assert sr.ContentSequence[0].TextValue == "spleen"
        sr.save_as(tmp_path / "sr.dcm")
        assert dciodvfy_errors(tmp_path / "sr.dcm") == []
        wait_for_log(lua, rf"Lua says: MedSegAgent: stable study {study}: already routed \(rule ct-abdomen-spleen\)")
        assert "MedSegAgent: stable study" not in re.sub(r".*Lua says: .*", "", lua.orthanc.log())  # Python idle
        assert len(lua.jobs(seg.StudyInstanceUID)) == 1
    finally:
        stop_stack(lua)


@pytest.mark.slow
def test_second_request_on_same_study_uses_the_new_text(stack, phantom_factory, tmp_path):
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    study = stack.orthanc.upload(fresh_study(files.series["CT"], tmp_path / "study", StudyDescription="RESEARCH"))
    uid = stack.orthanc.get_json(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"]

    def finished() -> int:
        return len([j for j in stack.jobs(uid) if j.state.value in ("delivered", "failed")])

    for n, text in enumerate(("spleen", "liver"), start=1):
        status, answer = stack.orthanc.post_json("/medsegagent/segment", {"study": study, "request": text})
        assert status == 200, answer
        wait_for(lambda n=n: finished() == n, 180, f"job {n}", stack)
    newest = max(stack.jobs(uid), key=lambda j: j.created_at)
    assert (newest.request_source, newest.request_text) == ("sr", "liver")
