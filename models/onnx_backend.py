"""Models exported to ONNX, run by onnxruntime.

:class:`OnnxModel` is the TorchScript backend's sibling: everything about the
input comes from the registry reference (``preprocessing``: orientation,
spacing, size, intensity; ``options``: foreground crop, sliding window,
activation), the model's grid is built and filled by the same machinery
(:class:`~medsegagent.models.backends.InputPlan`,
:func:`~medsegagent.models.backends.assemble_channels`), and the result is a
:class:`~medsegagent.models.backends.Prediction` on the model's grid.  A
network exported with a fixed input size (TAPS: 1 x 1 x 128 x 128 x 32) is run
patch by patch by the base class's sliding window (MONAI's
``sliding_window_inference``); a grid smaller than the patch is padded.

Two options reproduce post-network steps that published models apply to
their logits before thresholding them (TAPS does both): ``logit_sigma``
blurs the stitched logits, and ``threshold`` moves a sigmoid model's own
decision threshold to the 0.5 the ensemble uses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from medsegagent.models.backends import InputPlan, ModelLoadError, ModelSpec, _NetworkModel

__all__ = ["OnnxModel", "onnx_providers"]

log = logging.getLogger(__name__)

#: onnxruntime's element types this backend feeds.
_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def onnx_providers(device: torch.device, available: Sequence[str]) -> tuple[list[Any], torch.device]:
    """onnxruntime execution providers for ``device``, and the device they amount to.

    CUDA when it is asked for and this onnxruntime build has it (the CPU
    package does not: ``onnxruntime-gpu`` does), else the CPU.
    """
    if device.type == "cuda":
        if "CUDAExecutionProvider" in available:
            return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"], device
        log.warning("device %s requested but this onnxruntime has no CUDA provider; using the CPU", device)
    return ["CPUExecutionProvider"], torch.device("cpu")


class OnnxModel(_NetworkModel):
    """An ONNX file run by onnxruntime (CUDA provider on a GPU when the runtime has it).

    ``location`` is the ``.onnx`` file, or a folder holding ``model.onnx``.
    The network's single input is ``(batch, channels, *spatial)``; its first
    output holds the logits.  Options, besides those of
    :meth:`~medsegagent.models.backends.InputPlan.from_registry`:

    * ``roi_size``: sliding-window patch ``(x, y, z)``; defaults to the
      network's input size when the ONNX file fixes all three axes; one that
      fixes some axes only needs it, with those sizes;
    * ``axes``: ``xyz`` (default, MONAI's order) or ``zyx``;
    * ``activation``: ``softmax`` (default), ``sigmoid`` or ``none``;
    * ``background_channel``: ``true`` (default) when output channel ``v``
      is label value ``v`` (channel 0 the background); ``false`` for models
      with one channel per label and no background (channel ``v - 1``);
    * ``logit_sigma``: Gaussian sigma, in voxels of the model's grid, applied
      to the stitched logits before the activation;
    * ``threshold``: a sigmoid model's own decision threshold; its logits are
      shifted by ``logit(threshold)`` so that the ensemble's 0.5 means it;
    * ``sw_batch_size``: patches per run (default 4 on a GPU, 1 on the CPU).

    Parameters
    ----------
    spec : ModelSpec
        The model reference.
    device : str, optional
        Overrides ``spec.device``.
    """

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError(
                f"model {spec.name}: onnxruntime is not installed (pip install onnxruntime): {exc}"
            ) from exc
        self._setup(spec, device)
        file = spec.path / "model.onnx" if spec.path.is_dir() else spec.path
        if not file.is_file():
            raise ModelLoadError(f"model {spec.name}: {file} is missing")
        if not spec.labels:
            raise ModelLoadError(f"model {spec.name}: the registry must name the output labels of an ONNX model")
        options = spec.options
        try:
            plan = InputPlan.from_registry(spec.preprocessing, options, axes="xyz")
        except ValueError as exc:
            raise ModelLoadError(f"model {spec.name}: {exc}") from exc
        providers, self.device = onnx_providers(self.device, ort.get_available_providers())
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3  # warnings about unused initialisers are not the operator's business
        try:
            self.session = ort.InferenceSession(str(file), sess_options=session_options, providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"model {spec.name}: onnxruntime cannot load {file}: {exc}") from exc
        self.file = file
        self.plan = self._check_input(plan)
        self.labels = self._label_channels(options)
        self.logit_sigma = _number(spec.name, options, "logit_sigma", 0.0, low=0.0)
        self.logit_shift = self._threshold_shift(options)
        _number(spec.name, options, "sw_batch_size", 1, low=1)  # read by the base class's sliding window

    def _check_input(self, plan: InputPlan) -> InputPlan:
        """The plan with the network's fixed patch size (sets the input's name, type and fixed sizes)."""
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise ModelLoadError(
                f"model {self.name}: an ONNX segmentation model takes one input, {self.file} has {names}"
            )
        shape = list(inputs[0].shape)
        if len(shape) != 5:
            raise ModelLoadError(
                f"model {self.name}: input {inputs[0].name} is {shape}, expected (batch, channels, 3 axes)"
            )
        if inputs[0].type not in _INPUT_TYPES:
            raise ModelLoadError(f"model {self.name}: input type {inputs[0].type} is not supported (float or float16)")
        self.input_name = inputs[0].name
        self.input_type = _INPUT_TYPES[inputs[0].type]
        self.fixed_batch = shape[0] == 1
        wanted = max(len(self.channels), 1)
        if isinstance(shape[1], int) and shape[1] != wanted:
            raise ModelLoadError(
                f"model {self.name}: the network takes {shape[1]} input channel(s), the registry gives {wanted}"
            )
        # Per network axis: its fixed size, or None where the exported graph leaves it free.
        self.fixed_spatial = tuple(n if isinstance(n, int) and n > 0 else None for n in shape[2:])
        fixed = self.fixed_spatial if plan.axes == "xyz" else self.fixed_spatial[::-1]  # as (x, y, z)
        if all(n is None for n in fixed):
            return plan
        sizes = [n if n is not None else "free" for n in fixed]
        if all(n is not None for n in fixed) and plan.roi_size is None:
            return replace(plan, roi_size=tuple(fixed))
        if plan.roi_size is None:
            raise ModelLoadError(
                f"model {self.name}: the network's input size is fixed along some axes only {sizes} (x, y, z);"
                " set options.roi_size to a patch with those sizes"
            )
        if any(n is not None and n != r for n, r in zip(fixed, plan.roi_size, strict=True)):
            raise ModelLoadError(
                f"model {self.name}: options.roi_size {list(plan.roi_size)} differs from the network's fixed"
                f" input size {sizes} (x, y, z)"
            )
        return plan

    def _label_channels(self, options: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        background = options.get("background_channel", True)
        if not isinstance(background, bool):
            raise ModelLoadError(f"model {self.name}: options.background_channel must be true or false")
        offset = 0 if background else 1
        labels = {name: tuple(v - offset for v in values) for name, values in self.spec.labels.items()}
        outputs = self.session.get_outputs()[0].shape
        count = outputs[1] if len(outputs) == 5 and isinstance(outputs[1], int) else None
        for name, channels in labels.items():
            if min(channels) < 0 or (count is not None and max(channels) >= count):
                raise ModelLoadError(
                    f"model {self.name}: label {name!r} maps to output channel(s) {list(channels)}, the network has"
                    f" {count if count is not None else 'a dynamic number of'} output channel(s)"
                    f" (options.background_channel is {str(background).lower()})"
                )
        return labels

    def _threshold_shift(self, options: Mapping[str, Any]) -> float:
        if "threshold" not in options:
            return 0.0
        threshold = _number(self.name, options, "threshold", 0.5, low=0.0)
        if self.plan.activation != "sigmoid" or not 0.0 < threshold < 1.0:
            raise ModelLoadError(
                f"model {self.name}: options.threshold needs activation: sigmoid and a value in (0, 1), got"
                f" {threshold!r} with {self.plan.activation}"
            )
        return math.log(threshold / (1.0 - threshold))

    @property
    def memory_bytes(self) -> int:
        """The ONNX file's size: its weights, which onnxruntime holds in memory."""
        return int(self.file.stat().st_size)

    def _forward(self, tensor: torch.Tensor) -> torch.Tensor:
        """One batch through the session: the first output, as float32 on the CPU.

        Along an axis the network fixes, a smaller input is padded with zeros
        on both sides, as MONAI's sliding window pads a grid smaller than its
        patch, and the output cropped back.
        """
        spatial = tuple(tensor.shape[2:])
        short = [max((n or s) - s, 0) for n, s in zip(self.fixed_spatial, spatial, strict=True)]
        before = [d // 2 for d in short]
        if any(short):
            tensor = torch.nn.functional.pad(tensor, [v for k in (2, 1, 0) for v in (before[k], short[k] - before[k])])
        array = tensor.detach().cpu().numpy().astype(self.input_type, copy=False)
        if self.fixed_batch and array.shape[0] > 1:
            out = np.concatenate(
                [self.session.run(None, {self.input_name: array[i : i + 1]})[0] for i in range(len(array))]
            )
        else:
            out = self.session.run(None, {self.input_name: array})[0]
        crop = tuple(slice(p, p + s) for p, s in zip(before, spatial, strict=True))
        return torch.from_numpy(np.ascontiguousarray(out[(..., *crop)], dtype=np.float32))

    def _adjust_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logit_sigma`` and ``threshold`` on the stitched logits, before the base class's activation."""
        if self.logit_sigma > 0:
            from scipy import ndimage

            # The sigma is the same along every axis, so the network's axis order does not change the blur.
            sigma = (0.0, 0.0, *(self.logit_sigma,) * 3)
            logits = torch.from_numpy(ndimage.gaussian_filter(logits.cpu().numpy(), sigma, mode="nearest"))
        return logits - self.logit_shift


def _number(model: str, options: Mapping[str, Any], key: str, default: float, *, low: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
        raise ModelLoadError(f"model {model}: options.{key} must be a number >= {low:g}, got {value!r}")
    return float(value)
