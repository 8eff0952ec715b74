"""Shared fixtures: phantom studies and the external validators."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pytest

from medsegagent.dicom.image_writer import PhantomFiles, write_phantom
from medsegagent.dicom.phantom import Phantom, make_phantom

if TYPE_CHECKING:
    from medsegagent.node.service import Node

#: Tools installed into the venv (dicom3tools, dcmqi) live beside the interpreter.
VENV_BIN = Path(sys.executable).parent
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

T = TypeVar("T")


def tool(name: str) -> str:
    """Path of an external tool; fails (not skips) when it is missing: CI installs them."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run scripts/bootstrap.sh test")
    return path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (the tests' one definition)."""
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def pid_is_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return not stat.read_text().split(") ", 1)[-1].startswith("Z")
    except OSError:
        return False


def wait_until(condition: Callable[[], T], timeout: float = 5.0, interval: float = 0.02) -> T:
    """``condition()``'s first truthy value within ``timeout`` seconds, else its value at the deadline."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def wait_for(
    predicate: Callable[[], T], timeout: float, what: str, *, interval: float = 0.1, detail: Callable[[], str] = str
) -> T:
    """:func:`wait_until`'s value; the test fails, naming ``what`` and ``detail()``, if there is none in time."""
    value = wait_until(predicate, timeout, interval)
    if not value:
        pytest.fail(f"timed out waiting for {what}{detail()}")
    return value


def echo_ok(port: int, calling: str, called: str = "MEDSEG") -> bool:
    """Whether a C-ECHO from ``calling`` to the listener on loopback ``port`` succeeds (pynetdicom as the peer)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


@pytest.fixture
def start_node() -> Iterator[Callable[[Mapping[str, Any]], Node]]:
    """``start(config) -> Node``: a node running on a configuration mapping, stopped after the test."""
    from medsegagent.node.config import parse_config
    from medsegagent.node.service import Node

    nodes: list[Node] = []

    def start(config: Mapping[str, Any]) -> Node:
        node = Node(parse_config(dict(config)), poll_seconds=0.1)
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def dciodvfy_errors(path: Path) -> list[str]:
    """``Error`` lines dciodvfy reports for ``path`` (it writes to stderr)."""
    proc = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.fixture(scope="session")
def phantom_factory(tmp_path_factory):
    """Make (and cache per session) a written phantom: ``factory(**kwargs) -> (Phantom, PhantomFiles)``."""
    cache: dict[tuple, tuple[Phantom, PhantomFiles]] = {}

    def make(
        modality: str = "CT",
        *,
        seed: int = 1,
        slices: int = 24,
        size: int = 64,
        orientation: str = "axial",
        reverse_order: bool = False,
        multiframe: bool = False,
    ) -> tuple[Phantom, PhantomFiles]:
        key = (modality, seed, slices, size, orientation, reverse_order, multiframe)
        if key not in cache:
            phantom = make_phantom(modality, seed=seed, slices=slices, size=size, orientation=orientation)
            out = tmp_path_factory.mktemp(f"phantom-{modality.replace('+', '')}-{orientation}")
            cache[key] = (phantom, write_phantom(phantom, out, reverse_order=reverse_order, multiframe=multiframe))
        return cache[key]

    return make


# -- DICOM-SEG fixtures (issue 5) ----------------------------------------------------


@pytest.fixture(scope="session")
def seg_factory(phantom_factory):
    """Write a SEG of a phantom's ground truth: ``factory(out_dir, seg_type=..., modality=..., **geometry)``.

    Returns a ``types.SimpleNamespace`` with ``volume``, ``labels`` (the truth
    written, on the volume grid), ``specs``, ``sources`` (headers), ``files``
    (source files), ``path`` and ``dataset`` (the SEG).  ``empty`` names
    segment labels whose mask is cleared first (empty segments).
    """
    import types

    from medsegagent.dicom.seg import (
        AlgorithmInfo,
        SegmentMember,
        SegType,
        load_source_datasets,
        write_segmentation,
    )
    from medsegagent.dicom.series import choose_series, read_series, scan_folder
    from medsegagent.models.registry import load_registry
    from medsegagent.node.pipeline import segment_spec

    labels_of_demo = load_registry().datasets["Demo_CT_Abdomen"].labels
    specs = [
        segment_spec(label, (SegmentMember("demo_ct_abdomen", 1, 0.7), SegmentMember("other_model", 2, 0.3)))
        for label in labels_of_demo.values()
    ]
    volumes = {}

    def write(
        out_dir: Path,
        seg_type: SegType = SegType.BINARY,
        *,
        modality: str = "CT",
        empty: tuple[str, ...] = (),
        uid_key: str | None = None,
        models=(("demo_ct_abdomen", "sha256:00112233aabbccdd"), ("other_model", "1.2.0")),
        **geometry,
    ):
        phantom, files = phantom_factory(modality, **geometry)
        key = (modality, tuple(sorted(geometry.items())))
        if key not in volumes:
            series = choose_series(scan_folder(files.dicom_dir), "CT" if modality == "PT+CT" else None)
            volume = read_series(series)
            # The reader must recover the phantom's grid whatever the file order or encoding.
            assert volume.geometry.same_grid(phantom.geometry)
            volumes[key] = (series, volume, load_source_datasets(volume, series.files))
        series, volume, sources = volumes[key]
        # The demo label set counts the tumour (7) as liver (1).
        labels = np.where(phantom.labels == 7, 1, phantom.labels).astype(np.uint8)
        for name in empty:
            labels[labels == list(labels_of_demo).index(name) + 1] = 0
        out_dir = Path(out_dir)
        path = out_dir / f"seg-{seg_type.value.lower()}.dcm"
        dataset = write_segmentation(
            volume, sources, labels, specs, path,
            uid_key=uid_key or f"test/{modality}/{sorted(geometry.items())}",
            request_text="liver, spleen, kidneys, pancreas, aorta", request_source="test",
            algorithm=AlgorithmInfo(parameters={"fusion": "rank-weighted mean"}),
            seg_type=seg_type, models=models,
        )  # fmt: skip
        return types.SimpleNamespace(
            volume=volume, labels=labels, specs=specs, sources=sources, files=series.files, path=path, dataset=dataset
        )

    return write
