"""One study, end to end: read -> plan -> execute -> ensemble -> SEG + report.

This is the processor of the node (and of ``medsegagent segment``).  The
plan is made once, before this module runs it: the node plans when it finds
a job's request and stores the plan with the job; :func:`segment_study`
executes a plan on a study read by :func:`read_study`
(:func:`segment_folder` does all three for a folder and a text).  It leaves
in the output folder either a complete result (``seg.dcm``,
``report.json``, ``preview.png``) or nothing: results are assembled in a
staging folder and moved into place only when every step succeeded.
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
from typing import Any

import numpy as np
from pydicom import Dataset as DicomDataset

from medsegagent import __version__
from medsegagent.dicom.modality import routing_modality
from medsegagent.dicom.preview import render_preview
from medsegagent.dicom.secondary_capture import write_preview_sc
from medsegagent.dicom.seg import (
    ContributingModel,
    SegmentMember,
    SegmentSpec,
    SegType,
    label_counts,
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
from medsegagent.models.ensemble import (
    FusionRules,
    Member,
    OnDemand,
    StudyTarget,
    TargetResult,
    fuse_study,
    resolve_overlaps,
)
from medsegagent.models.executor import Executor, InProcessExecutor, ModelCache, ModelTask, TaskResult, TaskStatus
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


@dataclass(frozen=True)
class SkippedTarget:
    """A target of the plan with candidate datasets but no installed model among them."""

    target: str
    reason: str
    #: How to install the datasets' models (their install hints, else their names).
    install: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The report's form: ``{"target", "reason", "install"}``."""
        return {"target": self.target, "reason": self.reason, "install": list(self.install)}


@dataclass(frozen=True)
class StudyInput:
    """A study as :func:`read_study` read it: its series, the one segmented and its routing modality.

    Attributes
    ----------
    folder : Path
        Where the study's files are.
    series : mapping of str to SeriesInfo
        Every series of the folder, by Series Instance UID (headers only).
    chosen : SeriesInfo
        The image series that is segmented.
    volume : Volume
        Its pixels on its grid.
    modality : str or None
        The routing modality of the study (``CT``, ``MR:T1``, ``PT+CT`` ...).
    read_s : float
        Seconds spent reading.
    """

    folder: Path
    series: Mapping[str, SeriesInfo]
    chosen: SeriesInfo
    volume: Volume
    modality: str | None
    read_s: float = 0.0

    @property
    def images(self) -> list[SeriesInfo]:
        """The study's image series, largest first."""
        return image_series(dict(self.series))


@dataclass(frozen=True)
class OutputOptions:
    """What :func:`segment_study` writes besides ``seg.dcm``, ``preview.png`` and ``report.json``.

    Attributes
    ----------
    seg_type : SegType
        Encoding of ``seg.dcm``.
    volume_report : bool
        Also ``sr.dcm``, a TID 1500 Measurement Report of each segment's volume (plus
        ``seg-binary.dcm`` for it to reference when ``seg_type`` is LABELMAP).
    preview_sc : bool
        Also ``preview-sc.dcm``: the preview as a Secondary Capture for PACS that cannot show SEG.
    labelmap_copy : bool
        Also ``seg-labelmap.dcm``: the same segments as a LABELMAP SEG (RLE), for destinations
        that accept one (when ``seg_type`` is not LABELMAP already).
    """

    seg_type: SegType = SegType.BINARY
    volume_report: bool = False
    preview_sc: bool = False
    labelmap_copy: bool = False


@dataclass(frozen=True)
class RunContext:
    """What executes plans, shared across studies: the registry, the executor and the output options.

    Attributes
    ----------
    registry : Registry
        The model library the plans name.
    executor : Executor
        Runs the models (its own time limit applies to each).
    outputs : OutputOptions
        The files written besides the SEG.
    fusion_workers : int
        Threads of the ensemble (resampling releases the GIL).
    progress : callable, optional
        Receives one line per step (default: the log).
    """

    registry: Registry
    executor: Executor
    outputs: OutputOptions = OutputOptions()
    fusion_workers: int = 2
    progress: Progress | None = None

    @classmethod
    def in_process(
        cls,
        registry: Registry | None = None,
        *,
        device: str = "auto",
        workers: int = 2,
        outputs: OutputOptions = OutputOptions(),
        progress: Progress | None = None,
    ) -> RunContext:
        """A context with an in-process executor of ``workers`` threads over a fresh model cache.

        ``registry`` defaults to the installed one; ``device`` is where models that say ``auto`` run.
        """
        executor = InProcessExecutor(ModelCache(device), workers=workers)
        return cls(registry or load_registry(), executor, outputs, workers, progress)

    def say(self, message: str) -> None:
        """Report one step to :attr:`progress`, or to the log."""
        if self.progress is not None:
            self.progress(message)
        else:
            log.info("%s", message)


@dataclass(frozen=True)
class Provenance:
    """Where one study's request came from, and the key its result UIDs derive from.

    Attributes
    ----------
    request_source : str
        The instruction source (recorded in the SEG and the report).
    request_fallback : mapping, optional
        The unusable request passed over for this one (source, reason), recorded in the report.
    uid_key : str, optional
        Stable key of the result's UIDs (the job id in the node); defaults to the
        source series UID and the request.
    """

    request_source: str = "request"
    request_fallback: Mapping[str, str] | None = None
    uid_key: str | None = None


@dataclass
class StudyResult:
    """What :func:`segment_study` produced.

    ``predictions`` holds each model's own output (on the model's grid) for
    callers that judge members one by one (the real-scan demo, benchmarks).
    """

    seg_path: Path
    report_path: Path
    preview_path: Path
    report: dict[str, Any]
    labels: np.ndarray
    volume: Volume
    predictions: dict[str, Prediction] = field(default_factory=dict)


def _concept(label: Label) -> tuple[str, str | None]:
    # Labels of different datasets are the same structure when their SNOMED
    # type (and laterality modifier) agree; names differ between datasets.
    modifier = label.type_modifier.value if label.type_modifier is not None else None
    return (label.type.value, modifier)


def plan_segments(plan: Plan, registry: Registry) -> tuple[list[Segment], list[SkippedTarget]]:
    """Turn a plan into output segments with the installed models voting on each.

    Returns
    -------
    segments : list of Segment
        In plan order; one per distinct structure.
    skipped : list of SkippedTarget
        Targets that have candidates but no installed model (with the reason).
    """
    segments: dict[tuple[str, str | None], Segment] = {}
    skipped: list[SkippedTarget] = []
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
            skipped.append(SkippedTarget(target.text, "no installed model", tuple(hints)))
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


def fusion_rules(label: Label) -> FusionRules:
    """The plausibility rules :func:`~medsegagent.models.ensemble.fuse_target` applies to ``label``'s members."""
    return FusionRules(
        volume_range_ml=(float(label.volume_ml[0]), float(label.volume_ml[1])) if label.volume_ml else None,
        # Lesions may legitimately be many small pieces; anatomy is not.
        max_speckle_share=None if label.kind == LabelKind.LESION else MAX_SPECKLE_SHARE,
        speckle_ml=SPECKLE_ML,
        min_agreement=MIN_AGREEMENT,
    )


def weights_fingerprint(ref: ModelRef) -> str:
    """Digest of the weights a model reference runs (one task's folders of a shared TotalSegmentator home)."""
    prints = [model_fingerprint(path) for path in ref.weights_paths]
    if len(prints) == 1:
        return prints[0]
    return "sha256:" + hashlib.sha256("\n".join(prints).encode()).hexdigest()[:16]


@dataclass
class _Run:
    """One execution of a plan, filled in step by step (the report is made from it)."""

    study: StudyInput
    plan: Plan
    provenance: Provenance
    timings: dict[str, float]
    segments: list[Segment] = field(default_factory=list)
    skipped: list[SkippedTarget] = field(default_factory=list)
    outcomes: dict[str, TaskResult] = field(default_factory=dict)
    predictions: dict[str, Prediction] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    results: list[TargetResult] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.uint8))
    qualities: list[SegmentQuality] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    caution: str | None = None
    demo_models: bool = False
    preview_slice: int = 0


def build_tasks(segments: list[Segment]) -> list[ModelTask]:
    """One task per model of the plan, asking it for the labels its segments need."""
    specs: dict[str, ModelSpec] = {}
    wanted: dict[str, list[str]] = {}
    for segment in segments:
        for dataset, label, ref in segment.members:
            if ref.name not in specs:
                specs[ref.name] = ModelSpec.from_registry(ref, dataset)
                wanted[ref.name] = []
            if label.name not in wanted[ref.name]:
                wanted[ref.name].append(label.name)
    return [ModelTask(spec, tuple(wanted[name])) for name, spec in specs.items()]


def _needs_other_series(tasks: list[ModelTask], primary: Volume) -> bool:
    """Whether some model takes a channel the primary series cannot fill."""
    have = channel_modality(primary)
    for task in tasks:
        channels = task.spec.channels
        if len(channels) > 1:
            return True
        if channels and not any(m == have or (m == "MR" and have.startswith("MR")) for m in channels[0].modalities):
            return True
    return False


def _study_images(study: StudyInput, tasks: list[ModelTask]) -> StudyImages:
    """The primary volume plus, when a model needs them, the study's other image series."""
    if not _needs_other_series(tasks, study.volume):
        return StudyImages(study.volume)
    others = []
    for info in study.images:
        if info is study.chosen:
            continue
        try:
            others.append(read_series(info))
        except SeriesError as exc:  # an unreadable extra series fails only the models that need it
            log.warning("series %s skipped: %s", info.label, exc)
    return StudyImages(study.volume, tuple(others))


def read_study(dicom_dir: Path, series: Mapping[str, SeriesInfo] | None = None) -> StudyInput:
    """Read the series of ``dicom_dir`` that the study's routing modality names.

    Parameters
    ----------
    dicom_dir : Path
        Folder with the study's files (any order, sub-folders allowed).
    series : mapping, optional
        The folder's :func:`~medsegagent.dicom.series.scan_folder` result, when the caller holds it already.

    Raises
    ------
    PipelineError
        No image series, one the node cannot segment, unreadable pixels, a single image.
    """
    t0 = time.perf_counter()
    try:
        series = dict(series) if series is not None else scan_folder(Path(dicom_dir))
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
    return StudyInput(Path(dicom_dir), series, chosen, volume, modality, time.perf_counter() - t0)


def segment_folder(
    dicom_dir: Path,
    text: str,
    out_dir: Path,
    context: RunContext | None = None,
    *,
    collection: str | None = None,
    provenance: Provenance = Provenance(),
) -> StudyResult:
    """Read ``dicom_dir``, plan ``text`` for it and segment it: :func:`segment_study` for a folder and a text.

    ``context`` defaults to the installed registry and an in-process executor
    (:meth:`RunContext.in_process`); ``collection`` restricts routing to one
    registry collection.  Raises :class:`PipelineError` as :func:`segment_study` does.
    """
    context = context or RunContext.in_process()
    context.say(f"reading {dicom_dir}")
    study = read_study(Path(dicom_dir))
    context.say(f"series {study.chosen.label}, grid {study.volume.geometry.shape}, routing modality {study.modality}")
    plan = Router(context.registry).plan(text, modality=study.modality, collection=collection)
    return segment_study(study, plan, out_dir, context, provenance)


def segment_study(
    study: StudyInput, plan: Plan, out_dir: Path, context: RunContext, provenance: Provenance = Provenance()
) -> StudyResult:
    """Execute ``plan`` on ``study``: run its models, fuse their outputs, write the SEG and the report.

    The plan is the one the job stored (:meth:`Plan.from_json`): nothing is
    planned again here.  Results are assembled in a staging folder and moved
    into ``out_dir`` only when every step succeeded.

    Parameters
    ----------
    study : StudyInput
        The study as :func:`read_study` read it.
    plan : Plan
        What to segment, with which datasets (``plan.text`` is the request).
    out_dir : Path
        Receives ``seg.dcm``, ``report.json``, ``preview.png`` and the optional outputs.
    context : RunContext
        Registry, executor and output options (shared across studies by the node).
    provenance : Provenance
        Where the request came from and the key of the result's UIDs.

    Raises
    ------
    PipelineError
        With a message naming the problem and its :class:`FailureReason`; nothing is left in ``out_dir``.
    """
    run = _Run(study, plan, provenance, timings={"read": study.read_s, "plan": plan.elapsed_ms / 1000.0})
    run.segments, run.skipped = plan_segments(plan, context.registry)
    if not run.segments:
        raise _nothing_to_segment(plan, run.skipped, study.modality)
    context.say("plan: " + ", ".join(f"{s.label.name} <- {len(s.members)} model(s)" for s in run.segments))
    _run_models(run, context)

    t0 = time.perf_counter()
    context.say(f"ensemble: fusing {len(run.segments)} segment(s) on the source grid")
    run.results = _fuse_segments(run.segments, run.predictions, run.errors, study.volume, context.fusion_workers)
    run.labels = resolve_overlaps(run.results)
    run.timings["ensemble"] = time.perf_counter() - t0

    context.say("writing DICOM-SEG")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        _write_outputs(run, context, staging)
        report = _report(run)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        for name in [*run.outputs, "report.json"]:  # report last: its presence means "complete"
            (staging / name).replace(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    context.say(f"wrote {out_dir / 'seg.dcm'}")
    paths = (out_dir / "seg.dcm", out_dir / "report.json", out_dir / "preview.png")
    return StudyResult(*paths, report, run.labels, study.volume, run.predictions)


def _nothing_to_segment(plan: Plan, skipped: list[SkippedTarget], modality: str | None) -> PipelineError:
    """The failure of a plan none of whose targets has an installed model."""
    reasons = [f"{u.target}: {u.reason}" for u in plan.unmatched]
    reasons += [f"{s.target}: {s.reason} (install: {', '.join(s.install)})" for s in skipped]
    return PipelineError(
        f"nothing to segment for {plan.text!r} in a {modality} study" + (": " + "; ".join(reasons) if reasons else ""),
        FailureReason.NO_MODEL_INSTALLED if skipped else FailureReason.NOTHING_MATCHED,
    )


def _run_models(run: _Run, context: RunContext) -> None:
    """Run the plan's models on the study; fails only when every model failed."""
    t0 = time.perf_counter()
    tasks = build_tasks(run.segments)
    context.say(f"running {len(tasks)} model(s): {', '.join(t.name for t in tasks)}")
    run.outcomes = context.executor.run(tasks, _study_images(run.study, tasks))
    run.predictions = {n: r.prediction for n, r in run.outcomes.items() if r.ok and r.prediction is not None}
    run.errors = {n: r.error or r.status.value for n, r in run.outcomes.items() if not r.ok}
    run.timings["inference"] = time.perf_counter() - t0
    if not run.predictions:
        failed = "; ".join(f"{name}: {error}" for name, error in run.errors.items())
        raise PipelineError(f"every model failed ({failed})", FailureReason.MODEL_FAILED)


def _write_outputs(run: _Run, context: RunContext, staging: Path) -> None:
    """Write the SEG, the preview and the optional outputs into ``staging`` (names in ``run.outputs``)."""
    t0 = time.perf_counter()
    study, volume, text, labels = run.study, run.study.volume, run.plan.text, run.labels
    registry, options = context.registry, context.outputs
    # Each segment names its own voters with their ranks and weights; the
    # contributing models (with weight digests) make the SEG's Device UID.
    run.qualities = [assess_segment(r) for r in run.results]
    specs = [
        segment_spec(s.label, members_from_ranks(r.ranks, r.weights), q.note)
        for s, r, q in zip(run.segments, run.results, run.qualities, strict=True)
    ]
    ran = {ref.name: ref for s in run.segments for _, _, ref in s.members if ref.name in run.predictions}
    contributing = [ContributingModel(name, weights_fingerprint(ref)) for name, ref in sorted(ran.items())]
    run.demo_models = any(DEMO_COLLECTION in registry.datasets[ref.dataset].collections for ref in ran.values())
    run.caution = study_caution(run.qualities, run.demo_models)
    if run.caution:
        context.say(f"caution: {run.caution}")
    key = run.provenance.uid_key or f"{volume.series_instance_uid}/{' '.join(text.split()).lower()}"
    sources = load_source_datasets(volume, study.chosen.files)
    common = {"uid_key": key, "request_text": text, "request_source": run.provenance.request_source,
              "models": contributing, "caution": run.caution}  # fmt: skip
    # Every result series gets its own number, above the study's highest (earlier results included).
    numbers = iter(free_series_numbers(dict(study.series), 5))

    def seg(name: str, seg_type: SegType) -> DicomDataset:
        run.outputs.append(name)
        return write_segmentation(volume, sources, labels, specs, staging / name, seg_type=seg_type,
                                  series_number=next(numbers), **common)  # fmt: skip

    written = seg("seg.dcm", options.seg_type)
    run.outputs.append("preview.png")
    if options.labelmap_copy and options.seg_type is not SegType.LABELMAP:
        seg("seg-labelmap.dcm", SegType.LABELMAP)
    if options.volume_report:
        # TID 1500 references segments of a BINARY (or FRACTIONAL) SEG, never of a LABELMAP one.
        referenced = seg("seg-binary.dcm", SegType.BINARY) if options.seg_type is SegType.LABELMAP else written
        volumes = segment_volumes_ml(labels, len(specs), volume.geometry.voxel_volume_ml)
        write_volume_report(referenced, volumes, staging / "sr.dcm", key, request_text=text,
                            series_number=next(numbers))  # fmt: skip
        run.outputs.append("sr.dcm")
    colors = [spec.color or (255, 0, 0) for spec in specs]
    if options.preview_sc:
        write_preview_sc(volume, sources, labels, colors, staging / "preview-sc.dcm", uid_key=key,
                         request_text=text, series_number=next(numbers))  # fmt: skip
        run.outputs.append("preview-sc.dcm")
    run.preview_slice = render_preview(volume.array, labels, colors, staging / "preview.png", modality=volume.modality)
    run.timings["write"] = time.perf_counter() - t0


def _fuse_segments(
    segments: list[Segment],
    predictions: dict[str, Prediction],
    errors: dict[str, str],
    volume: Volume,
    workers: int = 2,
) -> list[TargetResult]:
    """Rank-aware fusion of every segment; failed models are listed as dropped with their reason."""
    targets: list[StudyTarget] = []
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
        targets.append(StudyTarget(segment.label.name, members, fusion_rules(segment.label)))
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


def _report(run: _Run) -> dict[str, Any]:
    """``report.json``: the request, the series, the plan, each model, each segment and the timings."""
    study, volume, provenance = run.study, run.study.volume, run.provenance
    voxel_ml = volume.geometry.voxel_volume_ml
    request: dict[str, Any] = {"text": run.plan.text, "source": provenance.request_source}
    if provenance.request_fallback:
        request["fallback"] = dict(provenance.request_fallback)
    segments = []
    counts = label_counts(run.labels)  # one pass over the label map for every segment
    for number, (s, r, q) in enumerate(zip(run.segments, run.results, run.qualities, strict=True), start=1):
        count = int(counts[number]) if number < counts.size else 0
        segments.append({
            "number": number, "label": s.label.name, "target": s.target, "dataset": s.dataset,
            "volume_ml": round(count * voxel_ml, 2), "empty": count == 0,
            "weights": {k: round(v, 4) for k, v in r.weights.items()}, "ranks": r.ranks, "dropped": r.dropped,
            "agreement": q.agreement.value, "agreement_dice": None if q.dice is None else round(q.dice, 3),
            "note": q.note,
        })  # fmt: skip
    return {
        "software": {"name": "medsegagent", "version": __version__},
        "request": request,
        "modality": study.modality,
        "series": {
            "uid": volume.series_instance_uid,
            "description": study.chosen.description,
            "modality": volume.modality,
            "shape": list(volume.geometry.shape),
            "spacing_mm": list(volume.geometry.spacing),
        },
        "plan": run.plan.to_json(),
        "models": [_model_entry(outcome) for outcome in run.outcomes.values()],
        "segments": segments,
        "skipped_targets": [s.to_json() for s in run.skipped],
        "timings_s": {k: round(v, 3) for k, v in run.timings.items()},
        "preview_slice": run.preview_slice,
        "outputs": list(run.outputs),
        "quality": {"caution": run.caution, "demo_models": run.demo_models},
    }


def _model_entry(outcome: TaskResult) -> dict[str, Any]:
    """One model's line in the report: status, device, seconds per step, or the reason it failed."""
    entry: dict[str, Any] = {"name": outcome.model, "status": "ok" if outcome.ok else "failed"}
    if outcome.ok and outcome.prediction is not None:
        seconds = {**outcome.seconds, **outcome.prediction.seconds}
        entry["device"] = outcome.prediction.device
        entry["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    else:
        entry["error"] = outcome.error or outcome.status.value
        if outcome.status is TaskStatus.TIMEOUT:
            entry["timeout"] = True
    return entry
