"""``medsegagent demo``: the whole node on one machine, no external service.

1. make a synthetic CT study (phantom with known organs) -- or, with
   ``--real``, write a real MRI (Colin27, Debian's ``mricron-data``) as a
   DICOM series;
2. start the node's DICOM listener on a free loopback port;
3. send the study to it over DICOM (C-STORE), as a PACS would;
4. once the study is complete, segment it from a plain-language request
   (routing, parallel models, rank-aware ensemble): the demo models on the
   phantom, the real brain-extraction models (HD-BET, deepbet) on Colin27;
5. write the DICOM-SEG, report and preview, and print Dice against the
   truth per organ (phantom) or against Colin27's published brain mask, for
   the ensemble and for each model alone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsegagent.dicom.image_writer import write_phantom
from medsegagent.dicom.phantom import Phantom, make_phantom
from medsegagent.dicom.realdata import colin27, write_colin27_series
from medsegagent.dicom.volume import Volume
from medsegagent.models.backends import Prediction
from medsegagent.models.registry import Registry
from medsegagent.models.resample import resample
from medsegagent.node.dispatch import DeliveryError, send_files
from medsegagent.node.intake import StorageSCP
from medsegagent.node.pipeline import Provenance, RunContext, StudyResult, segment_folder

DEFAULT_REQUEST = "Segment the liver, spleen, both kidneys, pancreas and aorta"
#: The real-scan demo's request: brain extraction on Colin27.
REAL_REQUEST = "Skull strip: segment the brain"
#: Phantom structures that make up each demo organ (the tumour lies in the liver).
_ORGAN_PARTS = {"liver": ("liver", "liver_tumour")}


@dataclass
class DemoOutcome:
    """What the demo produced, for the summary and for tests."""

    result: StudyResult
    dice: dict[str, float]
    seconds: dict[str, float]
    instances: int
    member_dice: dict[str, dict[str, float]] = field(default_factory=dict)
    truth: str = "the phantom's truth"


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
        scores[name] = mask_dice(labels == number, np.isin(truth, parts))
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

    result, seconds["transfer"], seconds["segment"] = through_node(
        work_dir, dicom_files, request, collection="demo", say=say
    )
    names = [s["label"] for s in result.report["segments"]]
    dice = organ_dice(phantom, result.volume, result.labels, names)
    del files
    return DemoOutcome(result=result, dice=dice, seconds=seconds, instances=len(dicom_files))


def through_node(
    work_dir: Path,
    dicom_files: list[Path],
    request: str,
    *,
    collection: str | None,
    say: Callable[[str], None],
    registry: Registry | None = None,
) -> tuple[StudyResult, float, float]:
    """Send ``dicom_files`` to a node listener over C-STORE and segment the study it assembles (with ``registry``).

    Returns
    -------
    result : StudyResult
        The pipeline's result.
    transfer_s, segment_s : float
        Seconds from the first C-STORE to the complete study, and for segmenting it.
    """
    scp = StorageSCP(work_dir / "spool", ae_title="MEDSEG", host="127.0.0.1", port=0, allowed_callers={"DEMO-PACS"})
    host, port = scp.start()
    try:
        t0 = time.perf_counter()
        say(f"node listening as MEDSEG on {host}:{port}; sending {len(dicom_files)} instances by C-STORE")
        sent = send_files(dicom_files, host=host, port=port, called_ae="MEDSEG", calling_ae="DEMO-PACS")
        if sent.failed:
            raise DeliveryError(f"{len(sent.failed)} instances were refused by the node")
        # Every instance is in the spool before its C-STORE is acknowledged: the study is complete now.
        study_dir = scp.spool_dir / study_uid_of(dicom_files[0])
        transfer = time.perf_counter() - t0
    finally:
        scp.stop()
    t0 = time.perf_counter()
    say(f"request: {request!r}")
    context = RunContext.in_process(registry, progress=say)
    result = segment_folder(
        study_dir, request, work_dir / "result", context, collection=collection, provenance=Provenance("demo")
    )
    return result, transfer, time.perf_counter() - t0


def run_real_demo(
    work_dir: Path, *, request: str = REAL_REQUEST, quiet: bool = False, registry: Registry | None = None
) -> DemoOutcome:
    """The real-scan demo: Colin27 (a real T1 MRI) through the node, brain extraction by real models.

    Dice is measured against ``ch2bet``, Colin27's published brain-extracted
    image, for the fused segment and for each model alone.  ``registry``
    defaults to the node's (the benchmark passes one with fewer models).

    Raises
    ------
    RealDataError
        When Colin27 is not installed (``apt-get install mricron-data``).
    """

    def say(message: str) -> None:
        if not quiet:
            print(f"  {message}", file=sys.stderr, flush=True)

    scan = colin27()
    t0 = time.perf_counter()
    say(f"writing Colin27 ({scan.t1}) as a DICOM MR series")
    dicom_files = write_colin27_series(work_dir / "study")
    seconds = {"dicom": time.perf_counter() - t0}
    result, seconds["transfer"], seconds["segment"] = through_node(
        work_dir, dicom_files, request, collection=None, say=say, registry=registry
    )
    truth = scan.brain_mask(result.volume.geometry)  # the node read back the grid that was written
    dice, members = {}, {}
    for segment in result.report["segments"]:
        dice[segment["label"]] = mask_dice(result.labels == segment["number"], truth)
        members[segment["label"]] = {
            name: mask_dice(prediction_mask(result.predictions[name], segment["label"]), truth)
            for name in [*segment["weights"], *segment["dropped"]]
            if name in result.predictions
        }
    return DemoOutcome(result, dice, seconds, len(dicom_files), members, "Colin27's brain mask (ch2bet)")


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    denom = int(np.count_nonzero(a) + np.count_nonzero(b))
    return 2.0 * float(np.count_nonzero(a & b)) / denom if denom else 1.0


def prediction_mask(prediction: Prediction, label: str) -> np.ndarray:
    """One model's own mask of ``label`` on the study grid (probability > 0.5).

    A member from another dataset may name the structure differently; it was
    asked for this segment only when its prediction holds a single map.
    """
    if label not in prediction.maps and len(prediction.maps) != 1:
        raise ValueError(f"model {prediction.model} has no map {label!r} (it has {sorted(prediction.maps)})")
    name = label if label in prediction.maps else next(iter(prediction.maps))
    return prediction.probability(name) > 0.5


def study_uid_of(path: Path) -> str:
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
        lines.append(
            f"    {seg['number']}. {seg['label']:<14} {seg['volume_ml']:8.1f} mL   {dice_text}   ({seg['agreement']})"
        )
        for model, member in outcome.member_dice.get(seg["label"], {}).items():
            lines.append(f"       {model:<22} alone: Dice {member:.3f}")
    caution = report.get("quality", {}).get("caution")
    lines += [
        f"  Dice against: {outcome.truth}",
        f"  caution     : {caution or 'none (the models agree)'}",
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
