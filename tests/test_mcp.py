"""The MCP server as an assistant drives it: the SDK's own client against ``medsegagent mcp``.

Over stdio, against a live node fed by DCMTK ``storescu``: discover the tools,
plan, segment a phantom study, follow the job to delivered and read volumes
close to the phantom's true ones.  Over streamable HTTP, a call without the
node's token is refused.  Nothing an assistant sees names a local path.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import yaml
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from medsegagent.node.config import ConfigError, parse_config
from medsegagent.node.inventory import spooled_studies
from medsegagent.node.service import Node
from tests.test_node import StoreSCP, _free_port, _storescu

TOKEN = "mcp-test-token"
TOOLS = {"plan", "list_models", "list_studies", "list_jobs", "segment", "job_status", "segment_volumes", "retry",
         "cancel"}  # fmt: skip
#: SNOMED CT codes the registry gives the demo labels (what the SEG must carry).
SNOMED = {"liver": "10200004", "spleen": "78961009"}


def _config(tmp_path: Path, dest_port: int) -> dict[str, Any]:
    return {
        "node": {"ae_title": "MEDSEG", "port": 0, "data_dir": str(tmp_path / "var"), "quiet_seconds": 0.5,
                 "collection": "demo", "min_free_disk_mb": 1},
        "peers": [{"ae_title": "MODALITY", "host": "127.0.0.1"}],
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": dest_port}],
        "instruction_sources": ["request"],  # a study waits for an explicit request: the assistant's
        "http": {"host": "127.0.0.1", "port": _free_port(), "token_env": "MEDSEG_MCP_TEST_TOKEN"},
        "mcp": {"host": "127.0.0.1", "port": _free_port()},
    }  # fmt: skip


def _write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _server_command(config_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medsegagent.node.cli", "mcp", "--config", str(config_path), *extra]


class Assistant:
    """An MCP client session that records every structured output it is given."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.seen: list[str] = []

    async def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        result = await self.session.call_tool(tool, arguments)
        assert not result.is_error, f"{tool}: {result.content[0].text}"
        self.seen.append(json.dumps(result.structured_content))
        return result.structured_content

    async def refused(self, tool: str, **arguments: Any) -> str:
        result = await self.session.call_tool(tool, arguments)
        assert result.is_error, f"{tool} was not refused: {result.structured_content}"
        return result.content[0].text


@pytest.mark.slow
def test_assistant_segments_a_received_study_over_stdio(phantom_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_MCP_TEST_TOKEN", TOKEN)
    pacs = StoreSCP(tmp_path / "pacs").start()
    config = _config(tmp_path, pacs.port)
    node = Node(parse_config(config), poll_seconds=0.1)
    try:
        node.start()
        phantom, files = phantom_factory("CT", seed=2, size=96, slices=32)
        _storescu(files.series["CT"], node.scp.port)
        server = StdioServerParameters(
            command=sys.executable, args=_server_command(_write_config(tmp_path, config))[1:],
            env={"MEDSEG_MCP_TEST_TOKEN": TOKEN},
        )  # fmt: skip
        api = httpx.Client(base_url=f"http://127.0.0.1:{node.http_port}", headers={"Authorization": f"Bearer {TOKEN}"})
        seen = asyncio.run(_conversation(server, phantom.volumes_ml(), api))
    finally:
        node.stop()
        pacs.stop()
    assert len(pacs.segs()) == 1
    # UIDs, descriptions, states and volumes; not one local path (data dir, spool, results, models).
    assert not [text for text in seen if str(tmp_path) in text or "/var/" in text or ".dcm" in text]


async def _conversation(server: StdioServerParameters, truth_ml: dict[str, float], api: httpx.Client) -> list[str]:
    async with stdio_client(server) as streams, ClientSession(*streams) as session:
        await session.initialize()
        assistant = Assistant(session)
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert set(tools) == TOOLS
        for tool in tools.values():
            assert tool.description and "\n" not in tool.description, tool.name
            assert tool.input_schema["type"] == "object" and tool.output_schema, tool.name
        assert tools["segment"].input_schema["required"] == ["study_uid", "request"]

        plan = await assistant.call("plan", request="liver and spleen", modality="CT")
        assert plan["selection"] == {"Demo_CT_Abdomen": [1, 2]}
        assert [t["concept"] for t in plan["targets"]] == ["liver", "spleen"]
        assert plan["explain"][0]["stage"] == "modality" and "Demo_CT_Abdomen" in plan["summary"]
        models = {m["name"]: m for m in (await assistant.call("list_models"))["models"]}
        assert models["demo_ct_unet"]["installed"] and "liver" in models["demo_ct_unet"]["labels"]

        (study,) = (await assistant.call("list_studies"))["studies"]
        assert study["modalities"] == ["CT"] and study["series"][0]["instances"] == 32
        # A refusal carries the HTTP API's own reason.
        refused = await assistant.refused("segment", study_uid="1.2.3.4", request="liver")
        assert api.post("/jobs", json={"study_uid": "1.2.3.4", "request": "liver"}).json()["detail"] in refused

        job = await assistant.call("segment", study_uid=study["study_uid"], request="liver and spleen")
        status = await _settled(assistant, job["job_id"])
        assert status["state"] == "delivered", status
        assert status["deliveries"][0]["state"] == "sent" and status["segments"] == 2
        assert {"read", "inference", "ensemble", "write"} <= set(status["pipeline_seconds"])
        assert status["state_seconds"]["running"] > 0
        refused = await assistant.refused("cancel", job_id=job["job_id"])
        assert api.post(f"/jobs/{job['job_id']}/cancel").json()["detail"] in refused

        volumes = await assistant.call("segment_volumes", job_id=job["job_id"])
        assert volumes["study_uid"] == study["study_uid"] and volumes["caution"] == "DEMO MODELS"
        for segment in volumes["segments"]:
            assert segment["type"]["code"] == SNOMED[segment["label"]] and segment["type"]["scheme"] == "SCT"
            # Measured: liver 1500 vs 1513 mL, spleen 171 vs 182 mL (demo models, this phantom).
            assert segment["volume_ml"] == pytest.approx(truth_ml[segment["label"]], rel=0.10), segment
        jobs = (await assistant.call("list_jobs", state="failed"))["jobs"]
        assert jobs and jobs[0]["error"].startswith("no usable request")  # the study's own job, before we asked
        refused = await assistant.refused("segment_volumes", job_id=jobs[0]["job_id"])
        assert api.get(f"/jobs/{jobs[0]['job_id']}/volumes").json()["detail"] in refused and "no SEG" in refused
        return assistant.seen


async def _settled(assistant: Assistant, job_id: str, timeout: float = 240.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await assistant.call("job_status", job_id=job_id, wait_s=30)
        if status["state"] in ("delivered", "failed", "cancelled"):
            return status
    pytest.fail(f"job {job_id} did not settle in {timeout:.0f} s")


def test_spooled_studies_skip_what_is_not_a_study(phantom_factory, tmp_path):
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    spool = tmp_path / "spool"
    series = files.series["CT"]
    study = spool / "1.2.3" / "1.2.3.4"
    study.mkdir(parents=True)
    for path in series[:3]:
        (study / path.name).write_bytes(path.read_bytes())
    broken = spool / "1.2.5" / "1.2.5.6"
    broken.mkdir(parents=True)
    (broken / "1.2.5.6.7.dcm").write_bytes(b"not DICOM")
    for foreign in (".incoming/1.2.3", "notes/1.2", "1.2.9"):  # the intake's temporary folder, junk, no series
        (spool / foreign).mkdir(parents=True)
    studies = {s.study_uid: s for s in spooled_studies(spool)}
    assert set(studies) == {"1.2.3", "1.2.5"}
    (good,) = studies["1.2.3"].series
    assert (good.modality, good.instances, studies["1.2.3"].modalities) == ("CT", 3, ["CT"])
    assert studies["1.2.3"].study_date is not None and len(studies["1.2.3"].study_date) == 10
    assert [(s.modality, s.instances) for s in studies["1.2.5"].series] == [("?", 1)]
    assert len(spooled_studies(spool, limit=1)) == 1


def test_http_transport_requires_the_node_token(tmp_path):
    config = _config(tmp_path, dest_port=_free_port())
    port = config["mcp"]["port"]
    proc = subprocess.Popen(
        _server_command(_write_config(tmp_path, config), "--transport", "http"),
        env={**os.environ, "MEDSEG_MCP_TEST_TOKEN": TOKEN}, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_listening(proc, port)
        url = f"http://127.0.0.1:{port}/mcp"
        hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                 "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                            "clientInfo": {"name": "curl", "version": "0"}}}  # fmt: skip
        headers = {"Accept": "application/json, text/event-stream"}
        for refused in ({}, {"Authorization": "Bearer wrong-token"}):
            response = httpx.post(url, json=hello, headers={**headers, **refused})
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"].startswith("Bearer")
        plan = asyncio.run(_plan_over_http(url))
        assert plan["selection"] == {"Demo_CT_Abdomen": [1]}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float = 60.0) -> None:
    """Wait for the server's port; a server that exits instead fails the test with what it said."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"medsegagent mcp exited with {proc.returncode}: {proc.stderr.read()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"medsegagent mcp does not listen on port {port} after {timeout:.0f} s")


async def _plan_over_http(url: str) -> dict[str, Any]:
    client = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"})
    async with client, streamable_http_client(url, http_client=client) as streams, ClientSession(*streams) as session:
        await session.initialize()
        result = await session.call_tool("plan", {"request": "liver", "modality": "CT"})
        assert not result.is_error, result.content[0].text
        return result.structured_content


def test_mcp_command_refuses_without_token_or_fixed_port(tmp_path):
    config = _config(tmp_path, dest_port=_free_port())
    env = {k: v for k, v in os.environ.items() if k != "MEDSEG_MCP_TEST_TOKEN"}
    result = subprocess.run(_server_command(_write_config(tmp_path, config)), env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "$MEDSEG_MCP_TEST_TOKEN" in result.stderr
    config["http"]["port"] = 0
    result = subprocess.run(_server_command(_write_config(tmp_path, config)), env={**env, "MEDSEG_MCP_TEST_TOKEN": "x"},
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "fixed HTTP port" in result.stderr


def test_mcp_config_section_is_validated():
    assert parse_config({}).mcp.host == "127.0.0.1"  # loopback unless the operator says otherwise
    with pytest.raises(ConfigError, match=r"mcp\.port: 70000 is not a valid TCP port"):
        parse_config({"mcp": {"port": 70000}})
    with pytest.raises(ConfigError, match=r"mcp\.path: unknown key"):
        parse_config({"mcp": {"path": "/x"}})
