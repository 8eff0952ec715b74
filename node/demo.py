"""``medsegagent demo``: the whole node on one machine, no external service.

1. make a synthetic CT study (phantom with known organs);
2. start the node's DICOM listener on a free loopback port;
3. send the study to it over DICOM (C-STORE), as a PACS would;
4. once the study is complete, segment it from a plain-language request with
   the demo models (routing, parallel models, rank-aware ensemble);
5. write the DICOM-SEG, report and preview, and print Dice against the
   phantom's truth per organ.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsegagent.dicom.image_writer import write_phantom
from medsegagent.dicom.phantom import Phantom, make_phantom
from medsegagent.dicom.volume import Volume
from medsegagent.models.resample import resample
from medsegagent.node.dispatch import send_files
from medsegagent.node.intake import StorageSCP
from medsegagent.node.pipeline import Result, segment_study

DEFAULT_REQUEST = "Segment the liver, spleen, both kidneys, pancreas and aorta"
#: Phantom structures that make up each demo organ (the tumour lies in the liver).
_ORGAN_PARTS = {"liver": ("liver", "liver_tumour")}


@dataclass
class DemoOutcome:
    """What the demo produced, for the summary and for tests."""

    result: Result
    dice: dict[str, float]
    seconds: dict[str, float]
    instances: int


def organ_dice(phantom: Phantom, volume: Volume, labels: np.ndarray, names: list[str]) -> dict[str, float]:
    """Dice of each output segment against the phantom's truth on the source grid."""
    truth = phantom.labels
    if not phantom.geometry.same_grid(volume.geometry):
        truth = resample(truth.astype(np.float32), phantom.geometry, volume.geometry, mode="nearest").astype(np.uint8)
    by_name = {name: value for value, name in phantom.label_names.items()}
    scores = {}
    for number, name in enumerate(names, start=1):
        parts = [by_name[p] for p in _ORGAN_PARTS.get(name, (name,)) if p in by_name]
        if not parts:
            continue
        a, b = labels == number, np.isin(truth, parts)
        denom = int(a.sum() + b.sum())
        scores[name] = 2.0 * float((a & b).sum()) / denom if denom else 1.0
    return scores


def run_demo(
    work_dir: Path,
    *,
    request: str = DEFAULT_REQUEST,
    seed: int = 7,
    size: int = 128,
    slices: int = 64,
    modality: str = "CT",
    quiet: bool = False,
) -> DemoOutcome:
    """Run the demo end to end in ``work_dir``; see the module docstring."""

    def say(message: str) -> None:
        if not quiet:
            print(f"  {message}", file=sys.stderr, flush=True)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    say(f"making a synthetic {modality} study (seed {seed}, {size}x{size}x{slices})")
    phantom = make_phantom(modality, seed=seed, slices=slices, size=size)
    files = write_phantom(phantom, work_dir / "study")
    dicom_files = sorted((work_dir / "study" / "dicom").glob("*.dcm"))
    seconds["phantom"] = time.perf_counter() - t0

    scp = StorageSCP(work_dir / "spool", ae_title="MEDSEG", host="127.0.0.1", port=0, allowed_callers={"DEMO-PACS"})
    host, port = scp.start()
    try:
        t0 = time.perf_counter()
        say(f"node listening as MEDSEG on {host}:{port}; sending {len(dicom_files)} instances by C-STORE")
        sent = send_files(dicom_files, host=host, port=port, called_ae="MEDSEG", calling_ae="DEMO-PACS")
        if sent.failed:
            raise RuntimeError(f"{len(sent.failed)} instances were refused by the node")
        study_uid = str(phantom_study_uid(dicom_files[0]))
        study_dir = scp.wait_for_study(study_uid, quiet_seconds=1.0, timeout=60, expected=len(dicom_files))
        seconds["transfer"] = time.perf_counter() - t0
    finally:
        scp.stop()
    t0 = time.perf_counter()
    say(f"request: {request!r}")
    result = segment_study(
        study_dir, request, work_dir / "result", collection="demo", request_source="demo", progress=say
    )
    seconds["segment"] = time.perf_counter() - t0
    names = [s["label"] for s in result.report["segments"]]
    dice = organ_dice(phantom, result.volume, result.labels, names)
    del files
    return DemoOutcome(result=result, dice=dice, seconds=seconds, instances=len(dicom_files))


def phantom_study_uid(path: Path) -> str:
    """Study Instance UID of a DICOM file."""
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def summary(outcome: DemoOutcome) -> str:
    """Human summary printed at the end of the demo."""
    report = outcome.result.report
    plan = report["plan"]
    lines = [
        "",
        "MedSegAgent demo",
        f"  instruction : {report['request']['text']}",
        f"  study       : {report['series']['description']} ({report['modality']}, "
        f"{'x'.join(map(str, report['series']['shape']))} voxels, {outcome.instances} instances over DICOM)",
        f"  plan        : {json_selection(plan)}",
        f"  models      : {', '.join(m['name'] + ' (' + m['status'] + ')' for m in report['models'])}",
        "  segments    :",
    ]
    for seg in report["segments"]:
        dice = outcome.dice.get(seg["label"])
        dice_text = f"Dice {dice:.3f}" if dice is not None else "no truth"
        lines.append(f"    {seg['number']}. {seg['label']:<14} {seg['volume_ml']:8.1f} mL   {dice_text}")
    lines += [
        f"  SEG         : {outcome.result.seg_path}",
        f"  preview     : {outcome.result.preview_path}",
        f"  report      : {outcome.result.report_path}",
        "  time        : " + ", ".join(f"{k} {v:.1f} s" for k, v in outcome.seconds.items()),
    ]
    return "\n".join(lines)


def json_selection(plan: dict) -> str:
    """``dataset[values]`` list of a plan's selection."""
    selection = plan.get("selection", {})
    return "; ".join(f"{name} {values}" for name, values in selection.items()) or "(nothing selected)"
