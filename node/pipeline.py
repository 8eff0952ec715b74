"""One study, end to end: read -> plan -> execute -> ensemble -> SEG + report.

This is the processor of the node (and of ``medsegagent segment``).  It
takes a folder of DICOM files and a request text and leaves in the output
folder either a complete result (``seg.dcm``, ``report.json``,
``preview.png``) or nothing: results are assembled in a staging folder and
moved into place only when every step succeeded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path

import numpy as np

from medsegagent import __version__
from medsegagent.dicom.modality import routing_modality
from medsegagent.dicom.preview import render_preview
from medsegagent.dicom.secondary_capture import write_preview_sc
from medsegagent.dicom.seg import (
    ContributingModel,
    SegmentMember,
    SegmentSpec,
    SegType,
    load_source_datasets,
    members_from_ranks,
    model_fingerprint,
    segment_label,
    write_segmentation,
)
from medsegagent.dicom.series import (
    SeriesError,
    SeriesInfo,
    choose_series,
    free_series_numbers,
    image_series,
    read_series,
    scan_folder,
)
from medsegagent.dicom.sr import segment_volumes_ml, write_volume_report
from medsegagent.dicom.volume import Volume
from medsegagent.models.backends import ModelSpec, Prediction, StudyImages, channel_modality
from medsegagent.models.ensemble import Member, OnDemand, TargetResult, fuse_study, resolve_overlaps
from medsegagent.models.executor import Executor, InProcessExecutor, Job, JobResult, ModelCache
from medsegagent.models.registry import (
    Dataset,
    Label,
    LabelKind,
    ModelRef,
    Registry,
    load_registry,
    normalize_modality,
)
from medsegagent.models.routing import Plan, Router
from medsegagent.node.jobs import FailureReason

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class PipelineError(RuntimeError):
    """A study the pipeline cannot turn into a result; the message says why, :attr:`reason` what kind."""

    def __init__(self, message: str, reason: FailureReason) -> None:
        super().__init__(message)
        self.reason = reason


def study_modality(series: Mapping[str, SeriesInfo]) -> str | None:
    """The routing modality of a scanned study, refused when no model could ever accept it.

    Raises
    ------
    PipelineError
        ``UNSUPPORTED_MODALITY`` for image series of another modality (OT, XA ...) or none.
    """
    modality = routing_modality(series)
    if modality is None:
        return None
    try:
        return normalize_modality(modality)
    except ValueError:
        found = sorted({s.modality.strip() or "none" for s in image_series(dict(series))})
        raise PipelineError(
            f"the image series have Modality {', '.join(found)}; the node segments CT, MR, PT and US",
            FailureReason.UNSUPPORTED_MODALITY,
        ) from None


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
    """What :func:`segment_study` produced.

    ``predictions`` holds each model's own output (on the model's grid) for
    callers that judge members one by one (the real-scan demo, benchmarks).
    """

    seg_path: Path
    report_path: Path
    preview_path: Path
    report: dict
    labels: np.ndarray
    volume: Volume
    predictions: dict[str, Prediction] = field(default_factory=dict)


def _concept(label: Label) -> tuple[str, str | None]:
    # Labels of different datasets are the same structure when their SNOMED
    # type (and laterality modifier) agree; names differ between datasets.
    modifier = label.type_modifier.value if label.type_modifier is not None else None
    return (label.type.value, modifier)


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
                voters = [ref for ref in installed if ref.serves_label(label_name)]
                key = _concept(label)
                segment = segments.get(key)
                if segment is None and voters:
                    segment = segments[key] = Segment(key, target.text, dataset.name, label)
                if segment is not None:
                    segment.members.extend((dataset, label, ref) for ref in voters)
                runnable += len(voters)
        if chosen and not runnable:
            hints = sorted({registry.datasets[c.dataset].install_hint or c.dataset for c in chosen})
            skipped.append({"target": target.text, "reason": "no installed model", "install": hints})
    return [s for s in segments.values() if s.members], skipped


#: While three or more members remain, the one whose mean Dice with the others is below this is an outlier.
MIN_AGREEMENT = 0.5
#: Share of a non-lesion mask allowed in pieces smaller than SPECKLE_ML before it counts as noise.
MAX_SPECKLE_SHARE = 0.25
SPECKLE_ML = 0.5
#: Two models whose mean Dice over a study's targets is below this are in conflict; the image arbitrates.
MIN_STUDY_AGREEMENT = 0.7
#: Registry collection of the models trained on phantoms: their results are labelled as such.
DEMO_COLLECTION = "demo"
#: A segment's models agree when the mean Dice of their plausible masks is at least this.
AGREED_DICE = 0.7


class Agreement(StrEnum):
    """How far the models behind one segment back each other (``report.json``, the SEG)."""

    #: Two or more models gave plausible masks with mean Dice >= :data:`AGREED_DICE`.
    AGREED = "agreed"
    #: One model serves the target: nothing to compare it with.
    SINGLE_MODEL = "single_model"
    #: Several models ran, only one gave a plausible mask: the result stands unchecked.
    UNCONFIRMED = "unconfirmed"
    #: The models' masks disagree: the ensemble kept what its rules favour, a reader should check it.
    DISPUTED = "disputed"
    #: No model gave a plausible mask (a note says so when models ran and gave implausible ones or failed).
    EMPTY = "empty"


@dataclass(frozen=True)
class SegmentQuality:
    """The agreement behind one segment and the note a reader gets about it."""

    agreement: Agreement
    dice: float | None = None
    note: str | None = None

    @property
    def doubtful(self) -> bool:
        """Whether readers should be warned that the models behind the segment disagree."""
        return self.agreement in (Agreement.UNCONFIRMED, Agreement.DISPUTED)

    @property
    def failed(self) -> bool:
        """Whether the segment is empty because its models gave only implausible masks or failed."""
        return self.agreement is Agreement.EMPTY and self.note is not None


def assess_segment(result: TargetResult) -> SegmentQuality:
    """Judge a fused segment by how far its members agreed (see :class:`Agreement`)."""
    candidates = len(set(result.ranks) | set(result.dropped))
    if not result.weights:
        # Members that ran and gave nothing plausible (or failed) are a finding; a structure
        # every model found absent ("empty output") is not.
        failed = [r for r in result.dropped.values() if not r.startswith("empty output")]
        note = f"no plausible mask from {len(failed)} of {candidates} models" if failed else None
        return SegmentQuality(Agreement.EMPTY, result.agreement, note)
    if result.agreement is None:
        if candidates <= 1:
            return SegmentQuality(Agreement.SINGLE_MODEL)
        return SegmentQuality(Agreement.UNCONFIRMED, None, f"unconfirmed: 1 of {candidates} models gave a mask")
    if result.agreement >= AGREED_DICE and len(result.weights) >= 2:
        return SegmentQuality(Agreement.AGREED, result.agreement)
    # Either the masks disagree, or they agreed but the placement rule dropped all but one.
    return SegmentQuality(Agreement.DISPUTED, result.agreement, f"models disagree (mean Dice {result.agreement:.2f})")


def study_caution(qualities: list[SegmentQuality], demo_models: bool) -> str | None:
    """The warning that leads the SEG's Series Description, or ``None`` for a result without doubts."""
    parts = []
    if demo_models:
        parts.append("DEMO MODELS")
    if any(q.doubtful for q in qualities):
        parts.append("MODELS DISAGREE")
    if any(q.failed for q in qualities):
        parts.append("MODELS FAILED")
    return ", ".join(parts) or None


def rank_key(dataset: Dataset, label: Label, ref: ModelRef, prediction: Prediction | None = None) -> tuple:
    """Ranking of a candidate, smaller first: registry quality, then dataset specificity.

    Ties (e.g. references without a registry quality) go to the model's own
    validation Dice where it ships one (bundle metadata); members still tied
    share a rank, and so a weight.
    """
    quality = (ref.quality or {}).get(label.name, label.quality) if isinstance(ref.quality, dict) else label.quality
    own = prediction.quality.get(label.name, 0.0) if prediction is not None else 0.0
    return (-(quality or 0.0), -(dataset.specificity or 0.0), -own)


def fusion_options(label: Label) -> dict:
    """The plausibility rules :func:`~medsegagent.models.ensemble.fuse_target` applies to ``label``'s members."""
    return {
        "volume_range_ml": tuple(label.volume_ml) if label.volume_ml else None,
        # Lesions may legitimately be many small pieces; anatomy is not.
        "max_speckle_share": None if label.kind == LabelKind.LESION else MAX_SPECKLE_SHARE,
        "speckle_ml": SPECKLE_ML,
        "min_agreement": MIN_AGREEMENT,
    }


def weights_fingerprint(ref: ModelRef) -> str:
    """Digest of the weights a model reference runs (one task's folders of a shared TotalSegmentator home)."""
    prints = [model_fingerprint(path) for path in ref.weights_paths]
    if len(prints) == 1:
        return prints[0]
    return "sha256:" + hashlib.sha256("\n".join(prints).encode()).hexdigest()[:16]


def build_jobs(segments: list[Segment], timeout_s: float | None = None) -> list[Job]:
    """One job per model of the plan, asking it for the labels its segments need."""
    specs: dict[str, ModelSpec] = {}
    wanted: dict[str, list[str]] = {}
    for segment in segments:
        for dataset, label, ref in segment.members:
            if ref.name not in specs:
                specs[ref.name] = ModelSpec.from_registry(ref, dataset)
                wanted[ref.name] = []
            if label.name not in wanted[ref.name]:
                wanted[ref.name].append(label.name)
    return [Job(spec, tuple(wanted[name]), timeout_s) for name, spec in specs.items()]


def _needs_other_series(jobs: list[Job], primary: Volume) -> bool:
    """Whether some model takes a channel the primary series cannot fill."""
    have = channel_modality(primary)
    for job in jobs:
        channels = job.spec.channels
        if len(channels) > 1:
            return True
        if channels and not any(m == have or (m == "MR" and have.startswith("MR")) for m in channels[0].modalities):
            return True
    return False


def _study_images(volume: Volume, chosen: SeriesInfo, images: list[SeriesInfo], jobs: list[Job]) -> StudyImages:
    """The primary volume plus, when a model needs them, the study's other image series."""
    if not _needs_other_series(jobs, volume):
        return StudyImages(volume)
    others = []
    for info in images:
        if info is chosen:
            continue
        try:
            others.append(read_series(info))
        except SeriesError as exc:  # an unreadable extra series fails only the models that need it
            log.warning("series %s skipped: %s", info.label, exc)
    return StudyImages(volume, tuple(others))


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
    executor: Executor | None = None,
    timeout_s: float | None = None,
    volume_report: bool = False,
    preview_sc: bool = False,
    labelmap_copy: bool = False,
    request_fallback: Mapping[str, str] | None = None,
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
        Loaded models, shared across studies (used by the default executor).
    workers : int
        Models run concurrently (default executor).
    uid_key : str, optional
        Stable key for the SEG's UIDs (the job id in the node); defaults to
        the source series UID and the request.
    progress : callable, optional
        Receives one line per step.
    executor : Executor, optional
        Runs the models; an in-process one over ``cache`` with ``workers``
        threads by default.
    volume_report : bool
        Also write ``sr.dcm``: a TID 1500 Measurement Report with each
        segment's volume (plus ``seg-binary.dcm`` for it to reference when
        ``seg_type`` is LABELMAP).
    preview_sc : bool
        Also write ``preview-sc.dcm``: the preview as a Secondary Capture for
        PACS that cannot show SEG.
    labelmap_copy : bool
        Also write ``seg-labelmap.dcm``: the same segments as a LABELMAP SEG
        (RLE), for destinations that accept one (when ``seg_type`` is not
        LABELMAP already).
    timeout_s : float, optional
        Wall-time limit per model; a model over it fails alone.
    request_fallback : mapping, optional
        The unusable request passed over for ``text`` (source, reason), recorded in the report.

    Raises
    ------
    PipelineError
        With a message naming the problem and its :class:`FailureReason`; nothing is left in ``out_dir``.
    """
    say = progress or (lambda message: log.info("%s", message))
    timings: dict[str, float] = {}
    registry = registry or load_registry()
    router = router or Router(registry)
    if executor is None:
        executor = InProcessExecutor(cache if cache is not None else ModelCache(), workers=workers)

    t0 = time.perf_counter()
    say(f"reading {dicom_dir}")
    try:
        series = scan_folder(Path(dicom_dir))
        images = image_series(series)
        modality = study_modality(series)
        if modality is None:
            choose_series(series)  # raises with the reason
        # Segment the series the routing modality came from (PET+CT: the CT), so a
        # study with several series never pairs an MR plan with the CT images.
        wanted = "CT" if modality == "PT+CT" else (modality.split(":")[0] if modality else None)
        chosen = choose_series(series, wanted)
        volume = read_series(chosen)
    except SeriesError as exc:
        raise PipelineError(str(exc), FailureReason.of(exc.problem)) from exc
    if volume.geometry.shape[0] < 2:
        # Every backend segments volumes; one image would be padded into a "volume" and segmented as noise.
        raise PipelineError(f"series {chosen.label} is a single image, not a volume; the models segment volumes",
                            FailureReason.IMPLAUSIBLE_GEOMETRY)  # fmt: skip
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
            f"nothing to segment for {text!r} in a {modality} study" + (": " + "; ".join(reasons) if reasons else ""),
            FailureReason.NO_MODEL_INSTALLED if skipped else FailureReason.NOTHING_MATCHED,
        )
    say("plan: " + ", ".join(f"{s.label.name} <- {len(s.members)} model(s)" for s in segments))

    t0 = time.perf_counter()
    jobs = build_jobs(segments, timeout_s)
    say(f"running {len(jobs)} model(s): {', '.join(j.name for j in jobs)}")
    study = _study_images(volume, chosen, images, jobs)
    outcomes = executor.run(jobs, study)
    predictions = {name: r.prediction for name, r in outcomes.items() if r.ok and r.prediction is not None}
    errors = {name: r.error or r.status for name, r in outcomes.items() if not r.ok}
    timings["inference"] = time.perf_counter() - t0
    if not predictions:
        failed = "; ".join(f"{name}: {error}" for name, error in errors.items())
        raise PipelineError(f"every model failed ({failed})", FailureReason.MODEL_FAILED)

    t0 = time.perf_counter()
    say(f"ensemble: fusing {len(segments)} segment(s) on the source grid")
    results = _fuse_segments(segments, predictions, errors, volume, workers)
    labels = resolve_overlaps(results)
    timings["ensemble"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("writing DICOM-SEG")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        # Each segment names its own voters with their ranks and weights; the
        # contributing models (with weight digests) make the SEG's Device UID.
        qualities = [assess_segment(r) for r in results]
        specs = [
            segment_spec(s.label, members_from_ranks(r.ranks, r.weights), q.note)
            for s, r, q in zip(segments, results, qualities, strict=True)
        ]
        ran = {ref.name: ref for s in segments for _, _, ref in s.members if ref.name in predictions}
        contributing = [ContributingModel(name, weights_fingerprint(ref)) for name, ref in sorted(ran.items())]
        demo = any(DEMO_COLLECTION in registry.datasets[ref.dataset].collections for ref in ran.values())
        caution = study_caution(qualities, demo)
        if caution:
            say(f"caution: {caution}")
        key = uid_key or f"{volume.series_instance_uid}/{' '.join(text.split()).lower()}"
        sources = load_source_datasets(volume, chosen.files)
        common = {"uid_key": key, "request_text": text, "request_source": request_source, "models": contributing,
                  "caution": caution}  # fmt: skip
        # Every result series gets its own number, above the study's highest (earlier results included).
        numbers = iter(free_series_numbers(series, 5))
        seg = write_segmentation(volume, sources, labels, specs, staging / "seg.dcm", seg_type=seg_type,
                                 series_number=next(numbers), **common)  # fmt: skip
        outputs = ["seg.dcm", "preview.png"]
        if labelmap_copy and seg_type is not SegType.LABELMAP:
            write_segmentation(volume, sources, labels, specs, staging / "seg-labelmap.dcm",
                               seg_type=SegType.LABELMAP, series_number=next(numbers), **common)  # fmt: skip
            outputs.append("seg-labelmap.dcm")
        if volume_report:
            # TID 1500 references segments of a BINARY (or FRACTIONAL) SEG, never of a LABELMAP one.
            referenced = seg
            if seg_type is SegType.LABELMAP:
                binary = staging / "seg-binary.dcm"
                referenced = write_segmentation(volume, sources, labels, specs, binary, seg_type=SegType.BINARY,
                                                series_number=next(numbers), **common)  # fmt: skip
                outputs.append("seg-binary.dcm")
            volumes = segment_volumes_ml(labels, len(specs), volume.geometry.voxel_volume_ml)
            write_volume_report(referenced, volumes, staging / "sr.dcm", key, request_text=text,
                                series_number=next(numbers))  # fmt: skip
            outputs.append("sr.dcm")
        if preview_sc:
            colors = [spec.color or (255, 0, 0) for spec in specs]
            write_preview_sc(volume, sources, labels, colors, staging / "preview-sc.dcm", uid_key=key,
                             request_text=text, series_number=next(numbers))  # fmt: skip
            outputs.append("preview-sc.dcm")
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
            outcomes,
            skipped,
            timings,
            shown,
        )
        report["outputs"] = outputs
        if request_fallback:
            report["request"]["fallback"] = dict(request_fallback)
        report["quality"] = {"caution": caution, "demo_models": demo}
        for entry, quality in zip(report["segments"], qualities, strict=True):
            entry["agreement"] = quality.agreement.value
            entry["agreement_dice"] = None if quality.dice is None else round(quality.dice, 3)
            entry["note"] = quality.note
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        for name in [*outputs, "report.json"]:  # report last: its presence means "complete"
            (staging / name).replace(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"wrote {out_dir / 'seg.dcm'}")
    paths = (out_dir / "seg.dcm", out_dir / "report.json", out_dir / "preview.png")
    return Result(*paths, report, labels, volume, predictions)


def _fuse_segments(
    segments: list[Segment],
    predictions: dict[str, Prediction],
    errors: dict[str, str],
    volume: Volume,
    workers: int = 2,
) -> list[TargetResult]:
    """Rank-aware fusion of every segment; failed models are listed as dropped with their reason."""
    targets = []
    failures = []
    for segment in segments:
        members: list[Member] = []
        failed: dict[str, str] = {}
        seen: set[str] = set()
        for dataset, label, ref in segment.members:
            if ref.name in seen:  # two targets may name the same structure
                continue
            seen.add(ref.name)
            prediction = predictions.get(ref.name)
            if prediction is None:
                failed[ref.name] = f"model failed: {errors.get(ref.name, 'no prediction')}"
            elif label.name not in prediction.maps:
                failed[ref.name] = f"model has no output for {label.name!r}"
            else:
                # Resampled to the study's grid when the ensemble reads it, only where the target can be.
                lazy = OnDemand(partial(prediction.mask_box, label.name), partial(prediction.boxed, label.name))
                members.append(Member(ref.name, lazy, rank_key(dataset, label, ref, prediction)))
        targets.append((segment.label.name, members, fusion_options(segment.label)))
        failures.append(failed)
    results = fuse_study(
        targets,
        voxel_ml=volume.geometry.voxel_volume_ml,
        shape=volume.geometry.shape,
        image=volume.array,
        min_study_agreement=MIN_STUDY_AGREEMENT,
        workers=workers,
    )
    for result, failed in zip(results, failures, strict=True):
        result.dropped.update(failed)
    return results


def fuse_label(dataset: Dataset, label: Label, predictions: Mapping[str, Prediction], volume: Volume) -> TargetResult:
    """One label of a dataset fused from its models' predictions, as :func:`segment_study` fuses a segment.

    For benchmarks and tests that judge the ensemble on predictions they
    already hold; the dataset's models without a prediction are left out.
    """
    members = [(dataset, label, ref) for ref in dataset.models if ref.name in predictions]
    segment = Segment(_concept(label), label.name, dataset.name, label, members)
    return _fuse_segments([segment], dict(predictions), {}, volume)[0]


def segment_spec(label: Label, members: tuple[SegmentMember, ...] = (), note: str | None = None) -> SegmentSpec:
    """The SEG segment of a registry label: its codes, colour and (optionally) the models that voted."""
    return SegmentSpec(
        label=segment_label(label.name),
        category=label.category.to_highdicom(),
        type=label.type.to_highdicom(),
        type_modifier=label.type_modifier.to_highdicom() if label.type_modifier is not None else None,
        color=tuple(label.color) if label.color else None,
        members=members,
        note=note,
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
    outcomes: dict[str, JobResult],
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
        "models": [_model_entry(outcome) for outcome in outcomes.values()],
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


def _model_entry(outcome: JobResult) -> dict:
    """One model's line in the report: status, device, seconds per step, or the reason it failed."""
    entry: dict = {"name": outcome.model, "status": "ok" if outcome.ok else "failed"}
    if outcome.ok and outcome.prediction is not None:
        seconds = {**outcome.seconds, **outcome.prediction.seconds}
        entry["device"] = outcome.prediction.device
        entry["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    else:
        entry["error"] = outcome.error or outcome.status
        if outcome.status == "timeout":
            entry["timeout"] = True
    return entry
