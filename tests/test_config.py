"""The node configuration's schema: values, defaults, relative paths, and errors an administrator can act on."""

from __future__ import annotations

import inspect
from pathlib import Path

import pydantic
import pytest

from medsegagent.dicom.seg import SegType
from medsegagent.node.config import (
    Config,
    ConfigError,
    ExecutorKind,
    InstructionSource,
    NodeSettings,
    RemoteKind,
    RetrieveMethod,
    TlsSettings,
    load_config,
    parse_config,
)
from medsegagent.node.intake import StorageSCP

DICOM = {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}
WEB = {"kind": "dicomweb", "url": "https://pacs.example/dicom-web"}


def _error(data: object) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    return str(err.value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"node": {"port": 70000}}, "node.port: 70000 is not a valid TCP port (0-65535)"),
        ({"node": {"port": True}}, "node.port: True is not a valid TCP port"),
        ({"mcp": {"port": 0}}, "mcp.port: 0 is not a valid TCP port (1-65535)"),
        ({"node": {"ae_title": "A\\B"}}, "node.ae_title: 'A\\\\B' is not a valid AE title (1-16 printable ASCII"),
        ({"node": {"host": "my host"}}, "node.host: 'my host' is not an IP address or host name"),
        ({"node": {"quiet_seconds": 0}}, "node.quiet_seconds: Input should be greater than 0 (got 0)"),
        ({"node": {"max_associations": "8"}}, "node.max_associations: Input should be a valid integer (got '8')"),
        ({"node": {"colour": 1}}, "node.colour: unknown key (known: ae_title, host, port, data_dir,"),
        ({"nodes": {}}, "nodes: unknown section; did you mean node? (known: node, peers, destinations,"),
        ({"http": {"tokenenv": "T"}}, "http.tokenenv: unknown key; did you mean token_env? (known: host, port,"),
        ({"node": 5}, "node: expected a mapping (got 5)"),
        ({"peers": "ORTHANC"}, "peers: expected a list (got 'ORTHANC')"),
        ({"peers": [{"host": "127.0.0.1"}]}, "peers[0].ae_title: required"),
        ({"http": {"token_env": "MY-TOKEN"}}, "http.token_env: 'MY-TOKEN' is not an environment variable name"),
        ({"http": {"enabled": "no"}}, "http.enabled: Input should be a valid boolean (got 'no')"),
        ({"instruction_sources": ["sr", "email"]}, "instruction_sources[1]: Input should be 'request', 'sr', "),
        ({"instruction_sources": ["worklist"]}, "instruction_sources: 'worklist' is listed but no worklist section"),
        ({"presets": {"LIVER": " "}}, "presets.LIVER: ' ' must not be empty"),
        ({"presets": {"WAY_TOO_LONG_AE_TITLE": "liver"}}, "presets.WAY_TOO_LONG_AE_TITLE: 'WAY_TOO_LONG_AE_TITLE' is"),
        ({"executor": {"kind": "spark"}}, "executor.kind: Input should be 'inprocess' or 'ray' (got 'spark')"),
        ({"executor": {"address": "a b"}}, "executor.address: 'a b' is not null, auto, HOST:PORT or ray://HOST:PORT"),
        ({"executor": {"models": {"unet": {"gpus": 1}}}}, "executor.models.unet: unknown placement key(s) ['gpus']"),
        ({"executor": {"local": {"cpus": 2}}}, "executor.local: ['cpus'] are not keys of a local Ray"),
        ({"destinations": [{"name": "pacs", **DICOM, "port": "x"}]}, "destinations[0].port: 'x' is not a valid TCP"),
        ({"destinations": [{"name": "pacs", "ae_title": "PACS"}]}, "destinations[0]: kind dicom needs host, port"),
        ({"destinations": [{**DICOM}]}, "destinations[0].name: required"),
        ({"destinations": [{"name": "p", **DICOM, "seg_type": "FRACTIONAL"}]}, "'FRACTIONAL' is not a SEG type"),
        ({"destinations": [{"name": "a", **DICOM}, {"name": "a", **WEB}]}, "destinations: names must be unique (a "),
        ({"destinations": [{"name": "w", **WEB, "port": 1}]}, "destinations[0]: port: a key of kind dicom, not of"),
        ({"destinations": [{"name": "p", **DICOM, "url": "https://x"}]}, "url: a key of kind dicomweb, not of kind"),
        ({"destinations": [{"name": "w", **WEB, "web": {}}]}, "destinations[0]: web: unknown key"),
        ({"destinations": [{"name": "w", "kind": "dicomweb"}]}, "destinations[0].url: required"),
        ({"destinations": [{"name": "w", **WEB, "url": "pacs:8042"}]}, "destinations[0].url: 'pacs:8042' is not an"),
        ({"destinations": [{"name": "w", **WEB, "tls_verify": "no"}]}, "destinations[0].tls_verify: Input should be"),
        ({"destinations": [{"name": "w", **WEB, "bogus": 1}]}, "destinations[0].bogus: unknown key (known: name, "),
        ({"sources": [{"name": "w", **WEB, "retrieve": "get"}]}, "sources[0]: retrieve: a key of kind dicom, not"),
        ({"sources": [{"name": "p", **DICOM, "retrieve": "copy"}]}, "sources[0].retrieve: Input should be 'move' or"),
        (
            {"sources": [{"name": "p", **DICOM}], "peers": [{"ae_title": "OTHER"}]},
            "sources: p: C-MOVE brings the study from PACS, which is not among the peers",
        ),
        (
            {"destinations": [{"name": "w", **WEB, "token_env": "T", "username": "u", "password_env": "P"}]},
            "destinations[0]: give one of token_env, token_file, or username with password_env or password_file",
        ),
        (
            {"destinations": [{"name": "w", **WEB, "username": "u"}]},
            "destinations[0]: username needs password_env or password_file",
        ),
        (
            {"destinations": [{"name": "w", **WEB, "url": "http://pacs.example/dicom-web", "token_env": "T"}]},
            "destinations[0]: http://pacs.example/dicom-web: credentials would cross the network in clear text",
        ),
        ([1, 2], "the top level must be a mapping of sections, not list"),
    ],
)  # fmt: skip
def test_an_error_names_the_key_the_value_and_what_is_allowed(data, expected):
    assert expected in _error(data)


def test_every_problem_is_listed_at_once():
    message = _error({"node": {"port": -1, "ae_title": ""}, "http": {"port": "80"}, "bogus": {}})
    lines = message.splitlines()
    assert lines[0] == "invalid configuration:" and len(lines) == 5
    assert {line.split(":")[0] for line in lines[1:]} == {"  - node.ae_title", "  - node.port", "  - http.port",
                                                           "  - bogus"}  # fmt: skip


def test_defaults_and_empty_sections():
    config = parse_config(None)
    assert config == parse_config({"http": None, "node": None, "peers": None}) == Config()
    assert config.node.port == 11112 and config.node.data_dir == Path("var") and config.http.token_env == "MEDSEG_TOKEN"
    assert config.instruction_sources == tuple(InstructionSource) and config.worklist is None
    assert config.executor.kind is ExecutorKind.INPROCESS and config.source is None


def test_the_listener_takes_its_defaults_from_the_configuration():
    """One copy of the defaults: StorageSCP's are NodeSettings'."""
    defaults = NodeSettings()
    parameters = inspect.signature(StorageSCP).parameters
    for key in ("ae_title", "host", "port", "max_associations", "max_pending_connections",
                "association_request_seconds"):  # fmt: skip
        assert parameters[key].default == getattr(defaults, key), key


def test_settings_are_frozen():
    config = parse_config({})
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.node.port = 1  # type: ignore[misc]


def test_relative_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    for name in ("node.pem", "node.key", "ca.pem", "pacs.token"):
        (site / name).write_text("x")
    (site / "node.yaml").write_text(
        "node:\n  models_dir: weights\n  port: ${MEDSEG_TEST_PORT:-104}\n"
        "  tls: {certificate: node.pem, private_key: node.key, ca_certificates: ca.pem,"
        " require_client_certificate: true}\n"
        "destinations: [{name: web, kind: dicomweb, url: 'https://pacs/dicom-web/', token_file: pacs.token}]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDSEG_TEST_PORT", "11113")
    config = load_config(Path("site/node.yaml"))
    assert config.source == Path("site/node.yaml") and config.node.port == 11113
    assert config.node.data_dir == site.resolve() / "var"  # the default too
    assert config.node.models_dir == site.resolve() / "weights"
    assert config.node.tls == TlsSettings(certificate=site / "node.pem", private_key=site / "node.key",
                                          ca_certificates=site / "ca.pem", require_client_certificate=True)  # fmt: skip
    [web] = config.destinations
    assert web.kind is RemoteKind.DICOMWEB and web.web is not None and web.describe() == "https://pacs/dicom-web"
    assert web.web.token_file == site.resolve() / "pacs.token" and web.web.timeout_s == 60.0

    (site / "node.yaml").write_text("node: {tls: {certificate: gone.pem, private_key: node.key}}\n")
    with pytest.raises(ConfigError, match=r"site/node.yaml: invalid configuration:\n  - node\.tls\.certificate: "
                                          r"'/.*/site/gone\.pem' is not a readable file"):  # fmt: skip
        load_config(Path("site/node.yaml"))


def test_tls_client_certificates_need_a_ca(tmp_path):
    for name in ("n.pem", "n.key"):
        (tmp_path / name).write_text("x")
    tls = {"certificate": "n.pem", "private_key": "n.key", "require_client_certificate": True}
    with pytest.raises(ConfigError, match=r"node\.tls: require_client_certificate needs ca_certificates"):
        parse_config({"node": {"tls": tls}}, source=tmp_path / "node.yaml")


def test_remotes_of_both_kinds():
    config = parse_config({
        "peers": [{"ae_title": "PACS", "host": "::1"}],
        "destinations": [{"name": "pacs", **DICOM, "seg_type": "labelmap", "volume_report": True},
                         {"name": "web", **WEB, "username": "medseg", "password_env": "PACS_PW", "timeout_s": 5}],
        "sources": [{"name": "pacs", **DICOM}, {"name": "get", **DICOM, "retrieve": "get", "timeout_s": 30},
                    {"name": "web", **WEB, "url": "http://127.0.0.1:8042/dicom-web", "token_env": "T"}],
    })  # fmt: skip
    pacs, web = config.destinations
    assert (pacs.describe(), pacs.seg_type, pacs.volume_report, pacs.web) == ("PACS@127.0.0.1:4242",
                                                                             SegType.LABELMAP, True, None)  # fmt: skip
    assert web.web is not None
    assert (web.web.username, web.web.password_env, web.web.timeout_s) == ("medseg", "PACS_PW", 5)
    move, get, wado = config.sources
    assert (move.retrieve, move.timeout_s, get.retrieve, get.timeout_s) == (RetrieveMethod.MOVE, 600,
                                                                             RetrieveMethod.GET, 30)  # fmt: skip
    assert wado.kind is RemoteKind.DICOMWEB and wado.web is not None and wado.web.token_env == "T"  # loopback: http


def test_numbers_read_from_the_environment_are_numbers(monkeypatch):
    monkeypatch.setenv("MEDSEG_TEST_AET", "1234")  # an AE title that reads as a number is still a title
    monkeypatch.setenv("MEDSEG_TEST_PORT", "eleven")
    path = Path(__file__).parent / "data" / "nonexistent.yaml"
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path)
    from medsegagent.node.config import expand_environment

    data = expand_environment({"node": {"ae_title": "${MEDSEG_TEST_AET}", "port": "${MEDSEG_TEST_PORT}"}})
    assert "node.port: 'eleven' is not a valid TCP port" in _error(data)
    assert parse_config({"node": {"ae_title": 1234}}).node.ae_title == "1234"
