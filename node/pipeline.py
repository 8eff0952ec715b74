"""One study, end to end: read -> plan -> execute -> ensemble -> SEG + report.

This is the processor of the node (and of ``medsegagent segment``).  It
takes a folder of DICOM files and a request text and leaves in the output
folder either a complete result (``seg.dcm``, ``report.json``,
``preview.png``) or nothing: results are assembled in a staging folder and
moved into place only when every step succeeded.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsegagent import __version__
from medsegagent.dicom.modality import study_modality
from medsegagent.dicom.preview import render_preview
from medsegagent.dicom.seg import AlgorithmInfo, SegmentSpec, SegType, load_source_datasets, write_segmentation
from medsegagent.dicom.series import SeriesError, SeriesInfo, choose_series, image_series, read_series, scan_folder
from medsegagent.dicom.volume import Volume
from medsegagent.models.backends import ModelLoadError, Prediction, SegmentationModel, load_model
from medsegagent.models.ensemble import Member, TargetResult, fuse_target, resolve_overlaps
from medsegagent.models.registry import Dataset, Label, ModelRef, Registry, load_registry
from medsegagent.models.routing import Plan, Router

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class PipelineError(RuntimeError):
    """A study the pipeline cannot turn into a result; the message says why."""


@dataclass
class Segment:
    """One output segment: what it is and who votes on it."""

    key: tuple[str, str | None]
    target: str
    dataset: str
    label: Label
    members: list[tuple[Dataset, Label, ModelRef]] = field(default_factory=list)


@dataclass
class Result:
    """What :func:`segment_study` produced."""

    seg_path: Path
    report_path: Path
    preview_path: Path
    report: dict
    labels: np.ndarray
    volume: Volume


def _concept(label: Label) -> tuple[str, str | None]:
    # Labels of different datasets are the same structure when their SNOMED
    # type (and laterality modifier) agree; names differ between datasets.
    modifier = label.type_modifier.value if label.type_modifier is not None else None
    return (label.type.value, modifier)


class ModelCache:
    """Loaded models by name, so a node loads each model once."""

    def __init__(self, device: str = "auto") -> None:
        self.device = device
        self._models: dict[str, SegmentationModel] = {}

    def get(self, ref: ModelRef) -> SegmentationModel:
        """The loaded model for ``ref`` (loading it on first use)."""
        if ref.name not in self._models:
            self._models[ref.name] = load_model(ref.name, str(ref.backend), ref.path, self.device)
        return self._models[ref.name]


def plan_segments(plan: Plan, registry: Registry) -> tuple[list[Segment], list[dict]]:
    """Turn a plan into output segments with the installed models voting on each.

    Returns
    -------
    segments : list of Segment
        In plan order; one per distinct structure.
    skipped : list of dict
        Targets that have candidates but no installed model (with the reason).
    """
    segments: dict[tuple[str, str | None], Segment] = {}
    skipped: list[dict] = []
    for target in plan.targets:
        if target.negated:
            continue
        runnable = 0
        chosen = [c for c in target.candidates if c.selected]
        for candidate in chosen:
            dataset = registry.datasets[candidate.dataset]
            installed = [ref for ref in dataset.models if ref.installed]
            for label_name in candidate.labels:
                label = dataset.labels[label_name]
                key = _concept(label)
                segment = segments.get(key)
                if segment is None and installed:
                    segment = segments[key] = Segment(key, target.text, dataset.name, label)
                if segment is not None:
                    segment.members.extend((dataset, label, ref) for ref in installed)
            runnable += len(installed)
        if chosen and not runnable:
            hints = sorted({registry.datasets[c.dataset].install_hint or c.dataset for c in chosen})
            skipped.append({"target": target.text, "reason": "no installed model", "install": hints})
    return [s for s in segments.values() if s.members], skipped


def _rank_key(dataset: Dataset, label: Label, ref: ModelRef) -> tuple:
    quality = (ref.quality or {}).get(label.name, label.quality) if isinstance(ref.quality, dict) else label.quality
    return (-(quality or 0.0), -(dataset.specificity or 0.0), ref.name)


def _run_models(
    refs: list[ModelRef], volume: Volume, cache: ModelCache, workers: int
) -> tuple[dict[str, Prediction], dict[str, str]]:
    """Run every model once, in parallel; failures stay per model."""
    predictions: dict[str, Prediction] = {}
    errors: dict[str, str] = {}

    def run(ref: ModelRef) -> Prediction:
        return cache.get(ref).predict(volume)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {ref.name: pool.submit(run, ref) for ref in refs}
        for name, future in futures.items():
            try:
                predictions[name] = future.result()
            except (ModelLoadError, RuntimeError, ValueError, OSError) as exc:
                log.error("model %s failed: %s", name, exc)
                errors[name] = str(exc)
    return predictions, errors


def segment_study(
    dicom_dir: Path,
    text: str,
    out_dir: Path,
    *,
    registry: Registry | None = None,
    router: Router | None = None,
    collection: str | None = None,
    request_source: str = "request",
    seg_type: SegType = SegType.BINARY,
    cache: ModelCache | None = None,
    workers: int = 2,
    uid_key: str | None = None,
    progress: Progress | None = None,
) -> Result:
    """Segment the image series of ``dicom_dir`` as ``text`` asks.

    Parameters
    ----------
    dicom_dir : Path
        Folder with the study's files (any order, sub-folders allowed).
    text : str
        The request, e.g. ``"liver and both kidneys"``.
    out_dir : Path
        Receives ``seg.dcm``, ``report.json`` and ``preview.png``.
    registry, router : optional
        Reused across studies by the node; loaded on demand otherwise.
    collection : str, optional
        Route within one registry collection only.
    request_source : str
        Where the request came from (recorded in the SEG and report).
    seg_type : SegType
        SEG encoding.
    cache : ModelCache, optional
        Loaded models, shared across studies.
    workers : int
        Models run concurrently.
    uid_key : str, optional
        Stable key for the SEG's UIDs (the job id in the node); defaults to
        the source series UID and the request.
    progress : callable, optional
        Receives one line per step.

    Raises
    ------
    PipelineError
        With a message naming the problem; nothing is left in ``out_dir``.
    """
    say = progress or (lambda message: log.info("%s", message))
    timings: dict[str, float] = {}
    registry = registry or load_registry()
    router = router or Router(registry)
    cache = cache or ModelCache()

    t0 = time.perf_counter()
    say(f"reading {dicom_dir}")
    try:
        series = scan_folder(Path(dicom_dir))
        images = image_series(series)
        modality = study_modality(_header(s) for s in images)
        if modality is None:
            choose_series(series)  # raises with the reason
        chosen = choose_series(series, "CT" if modality == "PT+CT" else None)
        volume = read_series(chosen)
    except SeriesError as exc:
        raise PipelineError(str(exc)) from exc
    timings["read"] = time.perf_counter() - t0
    say(f"series {chosen.label}, grid {volume.geometry.shape}, routing modality {modality}")

    t0 = time.perf_counter()
    plan = router.plan(text, modality=modality, collection=collection)
    timings["plan"] = time.perf_counter() - t0
    segments, skipped = plan_segments(plan, registry)
    if not segments:
        reasons = [f"{u['target']}: {u['reason']}" for u in plan.to_json().get("unmatched", [])]
        reasons += [f"{s['target']}: {s['reason']} (install: {', '.join(s['install'])})" for s in skipped]
        raise PipelineError(
            f"nothing to segment for {text!r} in a {modality} study" + (": " + "; ".join(reasons) if reasons else "")
        )
    say("plan: " + ", ".join(f"{s.label.name} <- {len(s.members)} model(s)" for s in segments))

    t0 = time.perf_counter()
    refs = list({ref.name: ref for s in segments for _, _, ref in s.members}.values())
    say(f"running {len(refs)} model(s): {', '.join(r.name for r in refs)}")
    predictions, errors = _run_models(refs, volume, cache, workers)
    timings["inference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results: list[TargetResult] = []
    for segment in segments:
        members = [
            Member(ref.name, predictions[ref.name].probabilities[label.name], _rank_key(dataset, label, ref))
            for dataset, label, ref in segment.members
            if ref.name in predictions and label.name in predictions[ref.name].probabilities
        ]
        if not members:
            results.append(TargetResult(segment.label.name, np.zeros(volume.geometry.shape, np.float32)))
            continue
        volume_range = tuple(segment.label.volume_ml) if segment.label.volume_ml else None
        results.append(
            fuse_target(
                segment.label.name, members, voxel_ml=volume.geometry.voxel_volume_ml, volume_range_ml=volume_range
            )
        )
    labels = resolve_overlaps(results)
    timings["ensemble"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("writing DICOM-SEG")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        specs = [_segment_spec(s.label) for s in segments]
        algorithm = AlgorithmInfo(
            parameters={
                s.label.name: ", ".join(f"{m}:rank{r.ranks.get(m)}:w{w:.2f}" for m, w in r.weights.items())[:64]
                or "none"
                for s, r in zip(segments, results, strict=True)
            }
        )
        key = uid_key or f"{volume.series_instance_uid}/{' '.join(text.split()).lower()}"
        sources = load_source_datasets(volume, chosen.files)
        write_segmentation(
            volume,
            sources,
            labels,
            specs,
            staging / "seg.dcm",
            uid_key=key,
            request_text=text,
            request_source=request_source,
            algorithm=algorithm,
            seg_type=seg_type,
        )
        shown = render_preview(
            volume.array,
            labels,
            [s.color or (255, 0, 0) for s in specs],
            staging / "preview.png",
            modality=volume.modality,
        )
        timings["write"] = time.perf_counter() - t0
        report = _report(
            text,
            request_source,
            modality,
            chosen,
            volume,
            plan,
            segments,
            results,
            labels,
            predictions,
            errors,
            skipped,
            timings,
            shown,
        )
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        for name in ("seg.dcm", "preview.png", "report.json"):  # report last: its presence means "complete"
            (staging / name).replace(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"wrote {out_dir / 'seg.dcm'}")
    return Result(out_dir / "seg.dcm", out_dir / "report.json", out_dir / "preview.png", report, labels, volume)


def _header(info: SeriesInfo) -> dict:
    import pydicom

    ds = pydicom.dcmread(info.files[0], stop_before_pixels=True)
    keys = ("Modality", "SeriesDescription", "SequenceName", "ProtocolName", "ContrastBolusAgent", "ImageType")
    return {k: ds.get(k) for k in keys}


def _segment_spec(label: Label) -> SegmentSpec:
    return SegmentSpec(
        label=label.name,
        category=label.category.to_highdicom(),
        type=label.type.to_highdicom(),
        type_modifier=label.type_modifier.to_highdicom() if label.type_modifier is not None else None,
        color=tuple(label.color) if label.color else None,
    )


def _report(
    text: str,
    source: str,
    modality: str | None,
    chosen: SeriesInfo,
    volume: Volume,
    plan: Plan,
    segments: list[Segment],
    results: list[TargetResult],
    labels: np.ndarray,
    predictions: dict[str, Prediction],
    errors: dict[str, str],
    skipped: list[dict],
    timings: dict[str, float],
    preview_slice: int,
) -> dict:
    voxel_ml = volume.geometry.voxel_volume_ml
    return {
        "software": {"name": "medsegagent", "version": __version__},
        "request": {"text": text, "source": source},
        "modality": modality,
        "series": {
            "uid": volume.series_instance_uid,
            "description": chosen.description,
            "modality": volume.modality,
            "shape": list(volume.geometry.shape),
            "spacing_mm": list(volume.geometry.spacing),
        },
        "plan": plan.to_json(),
        "models": [
            {"name": name, "status": "ok", "seconds": {k: round(v, 3) for k, v in p.seconds.items()}}
            for name, p in predictions.items()
        ]
        + [{"name": name, "status": "failed", "error": err} for name, err in errors.items()],
        "segments": [
            {
                "number": number,
                "label": s.label.name,
                "target": s.target,
                "dataset": s.dataset,
                "volume_ml": round(float(np.count_nonzero(labels == number)) * voxel_ml, 2),
                "empty": not bool(np.any(labels == number)),
                "weights": {k: round(v, 4) for k, v in r.weights.items()},
                "ranks": r.ranks,
                "dropped": r.dropped,
            }
            for number, (s, r) in enumerate(zip(segments, results, strict=True), start=1)
        ],
        "skipped_targets": skipped,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "preview_slice": preview_slice,
    }
