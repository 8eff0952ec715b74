"""Details behind docs/packaged-models.md: HD-BET's subnormal weights, its options, and the fused brain mask.

Everything runs in this process on the CPU, on Colin27 (Debian ``mricron-data``)
laid out as an axial series, through the registry's model references:

* ``subnormals``: per HD-BET fold file, how many weights are subnormal floats;
* ``configs``: deepbet and HD-BET in several settings (folds, mirroring,
  postprocessing): Dice of ``p > 0.5`` against ``ch2bet``, predict seconds and
  mask volume;
* ``fusion``: the default HD-BET and deepbet fused by the node's ensemble (as
  the pipeline fuses a segment: ``node.pipeline.fuse_label``), the agreement
  between the two, where both differ from ``ch2bet``, and other weightings of the two maps;
* ``unflushed`` (not in the default set; minutes): HD-BET fold 0 with its
  released weights as they are against the same fold with the subnormals
  flushed (the backend's default): seconds both ways and how far the maps differ.

Whole-node runs (DICOM in, SEG out), peak memory and each package run alone
are ``bench/bench_real.py``'s.

    python bench/brain_extraction_details.py                       # subnormals, configs, fusion
    python bench/brain_extraction_details.py --only fusion unflushed
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from medsegagent.dicom.realdata import colin27
from medsegagent.dicom.volume import Volume
from medsegagent.models.backends import ModelSpec, Prediction, load_model
from medsegagent.models.ensemble import resolve_overlaps
from medsegagent.models.registry import Registry, load_registry
from medsegagent.node.pipeline import fuse_label

DATASET = "Brain_Extraction"
PARTS = ("subnormals", "configs", "fusion", "unflushed")
#: name -> (model, options over the registry's) for ``configs``.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "deepbet": ("deepbet", {}),
    "HD-BET, fold 0, no mirroring (CPU default)": ("hd_bet", {}),
    "HD-BET, 5 folds, no mirroring": ("hd_bet", {"folds": "all", "tta": False}),
    "HD-BET, fold 0, mirroring": ("hd_bet", {"tta": True}),
    "HD-BET, fold 0, without postprocessing": ("hd_bet", {"postprocess": False}),
}


def _spec(registry: Registry, name: str, **options: Any) -> ModelSpec:
    dataset = registry.datasets[DATASET]
    ref = next(m for m in dataset.models if m.name == name)
    spec = ModelSpec.from_registry(ref, dataset)
    return replace(spec, options={**spec.options, **options}, device="cpu")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _run(spec: ModelSpec, volume: Volume) -> tuple[np.ndarray, float]:
    """The brain probability on the study grid and the seconds ``predict`` took."""
    model = load_model(spec, "cpu")
    t0 = time.perf_counter()
    prediction = model.predict(volume)
    seconds = time.perf_counter() - t0
    return prediction.probability("brain"), seconds


def subnormals(registry: Registry) -> list[str]:
    """Subnormal weights per HD-BET fold file."""
    folder = _spec(registry, "hd_bet").path
    lines = ["| fold file | weights | subnormal | share |", "|---|---|---|---|"]
    for file in sorted(Path(folder).glob("*.model")):
        state = torch.load(file, map_location="cpu", weights_only=True)
        floats = [t for t in state.values() if t.is_floating_point()]
        total = sum(t.numel() for t in floats)
        tiny = sum(int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum()) for t in floats)
        lines.append(f"| {file.name} | {total:,} | {tiny:,} | {100 * tiny / total:.1f} % |")
    return lines


def configs(registry: Registry, volume: Volume, reference: np.ndarray) -> list[str]:
    """Dice, seconds and volume per model setting."""
    ml = volume.geometry.voxel_volume_ml
    lines = ["| model | Dice | predict (s) | volume (mL) |", "|---|---|---|---|"]
    for name, (model, options) in CONFIGS.items():
        probability, seconds = _run(_spec(registry, model, **options), volume)
        mask = probability > 0.5
        lines.append(f"| {name} | {_dice(mask, reference):.4f} | {seconds:.1f} | {mask.sum() * ml:.0f} |")
    return lines


def _ensemble(registry: Registry, volume: Volume, predictions: dict[str, Prediction]) -> np.ndarray:
    """The node's fusion of the two maps (rank keys, plausibility rules), as the pipeline fuses a segment."""
    dataset = registry.datasets[DATASET]
    return resolve_overlaps([fuse_label(dataset, dataset.labels["brain"], predictions, volume)]) == 1


def fusion(registry: Registry, volume: Volume, reference: np.ndarray) -> list[str]:
    """The default models fused, their agreement, and other weightings of the two maps."""
    predictions = {name: load_model(_spec(registry, name), "cpu").predict(volume) for name in ("hd_bet", "deepbet")}
    hd, deep = (predictions[n].probability("brain") for n in ("hd_bet", "deepbet"))
    a, b = hd > 0.5, deep > 0.5
    ml = volume.geometry.voxel_volume_ml
    rows = {
        "node ensemble (equal ranks)": _ensemble(registry, volume, predictions),
        "mean of the maps > 0.5": (hd + deep) / 2 > 0.5,
        "HD-BET 2/3, deepbet 1/3, > 0.5": (2 * hd + deep) / 3 > 0.5,
        "deepbet 2/3, HD-BET 1/3, > 0.5": (hd + 2 * deep) / 3 > 0.5,
        "mean of the maps > 0.6": (hd + deep) / 2 > 0.6,
        "intersection of the masks": a & b,
    }
    lines = ["| fusion | Dice vs ch2bet |", "|---|---|"]
    lines += [f"| {name} | {_dice(mask, reference):.4f} |" for name, mask in rows.items()]
    lines += [
        "",
        f"HD-BET vs deepbet: Dice {_dice(a, b):.4f}",
        f"volumes (mL): ch2bet {reference.sum() * ml:.0f}, HD-BET {a.sum() * ml:.0f}, deepbet {b.sum() * ml:.0f}",
        f"brain to both models, not to ch2bet: {(a & b & ~reference).sum() * ml:.0f} mL;"
        f" ch2bet's brain that neither model finds: {(reference & ~a & ~b).sum() * ml:.0f} mL",
    ]
    return lines


def unflushed(registry: Registry, volume: Volume, reference: np.ndarray) -> list[str]:
    """HD-BET fold 0 with and without the subnormal weights flushed."""
    spec = _spec(registry, "hd_bet")
    flushed, seconds = _run(spec, volume)
    with mock.patch("medsegagent.models.brain_extraction._flush_denormals", lambda state: state):
        raw, raw_seconds = _run(spec, volume)
    return [
        "| HD-BET fold 0 | predict (s) | Dice vs ch2bet |",
        "|---|---|---|",
        f"| released weights as they are | {raw_seconds:.1f} | {_dice(raw > 0.5, reference):.4f} |",
        f"| subnormals flushed (backend) | {seconds:.1f} | {_dice(flushed > 0.5, reference):.4f} |",
        "",
        f"masks differ in {int(((raw > 0.5) != (flushed > 0.5)).sum())} voxels;"
        f" largest probability difference {float(np.abs(raw - flushed).max()):.2e}",
    ]


def main(argv: list[str] | None = None) -> int:
    """Print the chosen parts as Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, help="parts to run (default: all but unflushed)")
    args = parser.parse_args(argv)
    parts = args.only or [p for p in PARTS if p != "unflushed"]
    registry = load_registry()
    scan = colin27()
    volume = scan.volume()
    reference = scan.brain_mask(volume.geometry)
    print(f"Colin27 {volume.geometry.shape}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")
    runs = {
        "subnormals": lambda: subnormals(registry),
        "configs": lambda: configs(registry, volume, reference),
        "fusion": lambda: fusion(registry, volume, reference),
        "unflushed": lambda: unflushed(registry, volume, reference),
    }
    for part in PARTS:
        if part in parts:
            print(f"## {part}\n", *runs[part](), "", sep="\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
