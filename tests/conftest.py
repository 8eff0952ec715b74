"""Shared fixtures: phantom studies and the external validators."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medsegagent.dicom.image_writer import PhantomFiles, write_phantom
from medsegagent.dicom.phantom import Phantom, make_phantom

#: Tools installed into the venv (dicom3tools, dcmqi) live beside the interpreter.
VENV_BIN = Path(sys.executable).parent
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tool(name: str) -> str:
    """Path of an external tool; fails (not skips) when it is missing: CI installs them."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run scripts/bootstrap.sh test")
    return path


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
