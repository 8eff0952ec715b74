"""Benchmark: DICOM-SEG encode time and file size, the node's writer against dcmqi, in one run.

Source: a synthetic single-frame CT series (``slices x size x size``, written
with the node's image writer to a temporary folder).  Masks: ``segments``
non-overlapping ellipsoids (AMOS22 abdominal labels and codes from the
registry).  Each output type of :func:`~medsegagent.dicom.seg.write_segmentation`
(BINARY uncompressed, LABELMAP RLE, FRACTIONAL) is timed from the in-memory
masks and the source files on disk (reading the source headers included),
and dcmqi's ``itkimage2segimage`` is timed on the same masks (one NIfTI per
segment, written before the clock starts, plus its JSON metainfo) for a
binary and a labelmap SEG.  The ratio column is dcmqi time / ours and
our size / dcmqi's size.

Run::

    python bench/bench_seg.py            # 300 x 512 x 512, 10 segments -> bench/results/seg.md
    python bench/bench_seg.py --quick    # 16 x 64 x 64 in seconds -> bench/results/seg-quick.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pydicom

from medsegagent.dicom import seg as seg_module
from medsegagent.dicom import sr as sr_module
from medsegagent.dicom.image_writer import StudyInfo, deterministic_uid, write_series
from medsegagent.dicom.phantom import make_phantom, write_phantom
from medsegagent.dicom.preview import render_preview
from medsegagent.dicom.secondary_capture import write_preview_sc
from medsegagent.dicom.seg import (
    SegmentSpec,
    SegType,
    label_counts,
    load_source_datasets,
    save_as_file,
    write_segmentation,
)
from medsegagent.dicom.series import read_series
from medsegagent.dicom.sr import segment_volumes_ml, write_volume_report
from medsegagent.dicom.streamwrite import write_multiframe
from medsegagent.dicom.volume import Geometry, Volume
from medsegagent.models.registry import load_registry
from medsegagent.node.memory import retain_freed_memory
from medsegagent.node.pipeline import segment_spec

ROOT = Path(__file__).resolve().parent
#: Registry dataset whose first labels name (and code) the benchmark segments.
LABEL_SOURCE = "AMOS22_Task2"


@dataclass
class Row:
    """One measured encoding."""

    writer: str
    seg_type: str
    transfer_syntax: str
    frames: int
    seconds: float
    size_bytes: int


def ellipsoid_labels(shape: tuple[int, int, int], n_segments: int) -> np.ndarray:
    """``n_segments`` non-overlapping ellipsoids, one per cell of a 2 x ceil(n/2) grid (label map)."""
    slices, rows, cols = shape
    per_row = int(np.ceil(n_segments / 2))
    labels = np.zeros(shape, np.uint8)
    cell_r, cell_c = rows / 2, cols / per_row
    for index in range(n_segments):
        r0, c0 = (index // per_row) * cell_r, (index % per_row) * cell_c
        centre = np.array([slices * (0.35 + 0.03 * (index % 5)), r0 + cell_r / 2, c0 + cell_c / 2])
        radii = np.array([slices * (0.2 + 0.02 * (index % 4)), cell_r * 0.4, cell_c * 0.4])
        lo = np.maximum(np.floor(centre - radii).astype(int), 0)
        hi = np.minimum(np.ceil(centre + radii).astype(int) + 1, shape)
        k, j, i = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        inside = (
            ((k - centre[0]) / radii[0]) ** 2 + ((j - centre[1]) / radii[1]) ** 2 + ((i - centre[2]) / radii[2]) ** 2
        )
        block = labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        block[inside <= 1.0] = index + 1
    return labels


def write_source(out_dir: Path, shape: tuple[int, int, int]) -> tuple[Volume, list[Path]]:
    """A plain single-frame axial CT series on ``shape`` (0.8 mm pixels, 1.5 mm slices)."""
    _, rows, cols = shape
    geometry = Geometry(
        shape, origin=(-200.0, -200.0, -200.0), row_direction=(1, 0, 0), column_direction=(0, 1, 0),
        slice_direction=(0, 0, 1), spacing=(1.5, 400.0 / rows, 400.0 / cols),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    image = rng.normal(40.0, 20.0, size=shape).astype(np.float32)
    study = StudyInfo(study_instance_uid=deterministic_uid("bench-seg", shape), study_description="BENCH SEG")
    files = write_series(
        image, geometry, "CT", out_dir, study=study, series_number=2, series_description="BENCH CT",
        frame_of_reference_uid=deterministic_uid("bench-seg", shape, "for"),
    )  # fmt: skip
    del image
    return read_series(files), files


def segment_specs(n_segments: int) -> list[SegmentSpec]:
    """Registry-coded specs for the first ``n_segments`` labels of :data:`LABEL_SOURCE`."""
    labels = list(load_registry().datasets[LABEL_SOURCE].labels.values())
    if n_segments > len(labels):
        raise SystemExit(f"at most {len(labels)} segments (labels of {LABEL_SOURCE})")
    return [segment_spec(label) for label in labels[:n_segments]]


def dcmqi_inputs(
    labels: np.ndarray, geometry: Geometry, specs: list[SegmentSpec], out_dir: Path
) -> tuple[list[Path], Path]:
    """One NIfTI per segment and the metainfo JSON for ``itkimage2segimage``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, attributes = [], []
    for number, spec in enumerate(specs, start=1):
        mask = np.ascontiguousarray((labels == number).astype(np.uint8).transpose(2, 1, 0))
        image = nib.Nifti1Image(mask, geometry.nifti_affine())
        image.header.set_xyzt_units("mm")
        path = out_dir / f"segment-{number:02d}.nii.gz"
        nib.save(image, path)
        paths.append(path)

        def code(concept):
            return {
                "CodeValue": concept.value,
                "CodingSchemeDesignator": concept.scheme_designator,
                "CodeMeaning": concept.meaning,
            }

        attributes.append(
            [
                {
                    "labelID": 1,
                    "SegmentLabel": spec.label,
                    "SegmentAlgorithmType": "AUTOMATIC",
                    "SegmentAlgorithmName": "bench",
                    "SegmentedPropertyCategoryCodeSequence": code(spec.category),
                    "SegmentedPropertyTypeCodeSequence": code(spec.type),
                    "recommendedDisplayRGBValue": list(spec.color or (255, 0, 0)),
                }
            ]
        )
    meta = {
        "ContentCreatorName": "BENCH",
        "ClinicalTrialSeriesID": "1",
        "ClinicalTrialTimePointID": "1",
        "SeriesDescription": "dcmqi bench",
        "SeriesNumber": "300",
        "InstanceNumber": "1",
        "BodyPartExamined": "ABDOMEN",
        "ContentLabel": "SEGMENTATION",
        "ContentDescription": "bench",
        "segmentAttributes": attributes,
    }
    meta_path = out_dir / "meta.json"
    meta_path.write_text(json.dumps(meta, indent=1))
    return paths, meta_path


def run_ours(
    volume: Volume, files: list[Path], labels: np.ndarray, specs: list[SegmentSpec], out_dir: Path
) -> list[Row]:
    rows = []
    for seg_type in SegType:
        out = out_dir / f"ours-{seg_type.value.lower()}.dcm"
        start = time.perf_counter()
        sources = load_source_datasets(volume, files)
        seg = write_segmentation(volume, sources, labels, specs, out, uid_key="bench", seg_type=seg_type)
        seconds = time.perf_counter() - start
        rows.append(
            Row(
                "node (highdicom)",
                seg_type.value,
                seg.file_meta.TransferSyntaxUID.name,
                int(seg.NumberOfFrames),
                seconds,
                out.stat().st_size,
            )
        )
        del seg
    return rows


def run_dcmqi(inputs: list[Path], meta: Path, source_dir: Path, out_dir: Path) -> list[Row]:
    tool = shutil.which("itkimage2segimage") or str(Path(sys.executable).parent / "itkimage2segimage")
    rows = []
    for kind in ("binary", "labelmap"):
        out = out_dir / f"dcmqi-{kind}.dcm"
        command = [
            tool, "--inputImageList", ",".join(map(str, inputs)), "--inputDICOMDirectory", str(source_dir),
            "--outputDICOM", str(out), "--inputMetadata", str(meta), "--segmentationType", kind,
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"dcmqi {kind} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        ds = pydicom.dcmread(out, stop_before_pixels=True)
        rows.append(
            Row(
                "dcmqi itkimage2segimage",
                kind.upper(),
                ds.file_meta.TransferSyntaxUID.name,
                int(ds.NumberOfFrames),
                seconds,
                out.stat().st_size,
            )
        )
    return rows


def table(rows: list[Row], shape: tuple[int, int, int], n_segments: int, command: str) -> str:
    """The markdown report: setup, then one line per encoding with ratios against dcmqi."""
    dcmqi = {r.seg_type: r for r in rows if r.writer.startswith("dcmqi")}
    lines = [
        "# DICOM-SEG encode benchmark",
        "",
        f"* command: `{command}`",
        f"* date: {datetime.now().isoformat(timespec='seconds')}; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        f"* source: single-frame CT, {shape[0]} x {shape[1]} x {shape[2]}; {n_segments} non-overlapping "
        "ellipsoid segments (label map in memory)",
        "* glibc keeps freed memory (`retain_freed_memory`, as the node); node time = read the source headers + "
        "build + write the SEG; dcmqi time = the whole "
        "`itkimage2segimage` process (reads the DICOM series and one NIfTI per segment)",
        "* ratios: *time x* = dcmqi time / this time (above 1: faster than dcmqi); *size x* = this size / "
        "dcmqi size; FRACTIONAL and node rows compare with dcmqi's encoding of the same type (BINARY for FRACTIONAL)",
        "",
        "| type | writer | transfer syntax | frames | time s | size MB | time x vs dcmqi | size x vs dcmqi |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peer = dcmqi.get(row.seg_type) or dcmqi.get("BINARY")
        if row.writer.startswith("dcmqi"):
            time_ratio = size_ratio = "1 (reference)"
        else:
            time_ratio = f"{peer.seconds / row.seconds:.2f}"
            size_ratio = f"{row.size_bytes / peer.size_bytes:.3f}"
        lines.append(
            f"| {row.seg_type} | {row.writer} | {row.transfer_syntax} | {row.frames} | {row.seconds:.2f} | "
            f"{row.size_bytes / 1e6:.2f} | {time_ratio} | {size_ratio} |"
        )
    return "\n".join(lines) + "\n"


# --- The node's write stage, before/after the streamed SEG writer -----------------------------------

#: Heading of the write-stage section in bench/results/seg.md (the encode table above it is kept).
STAGE_HEADING = "## Write stage, before and after the streamed SEG writer"
#: Label set of the phantom's organs (the node's demo CT dataset: liver, spleen, kidneys, pancreas, aorta).
STAGE_LABELS = "Demo_CT_Abdomen"


def _whole_map_counts(labels: np.ndarray) -> np.ndarray:
    """Voxels per label as counted before: through one mask of the whole map (78 MB for 300 x 512²)."""
    counts = np.bincount(labels[labels > 0])
    counts[:1] = 0
    return counts


#: Before: pydicom's save_as and whole-map label counts.  After: the streamed writer, counts slab by slab.
VARIANTS: dict[str, tuple[Callable, Callable]] = {
    "before": (save_as_file, _whole_map_counts),
    "after": (write_multiframe, label_counts),
}


@contextmanager
def _variant(save: Callable, counts: Callable) -> Iterator[None]:
    with (
        mock.patch.object(seg_module, "write_multiframe", save),
        mock.patch.object(seg_module, "label_counts", counts),
        mock.patch.object(sr_module, "label_counts", counts),
    ):
        yield


def stage_once(volume: Volume, files: list[Path], labels: np.ndarray, out: Path, variant: tuple) -> dict[str, float]:
    """One write stage as ``node.pipeline._write_outputs`` runs it with every output on: seconds per part."""
    specs = [segment_spec(label) for label in load_registry().datasets[STAGE_LABELS].labels.values()]
    colors = [spec.color or (255, 0, 0) for spec in specs]
    parts: dict[str, float] = {}
    with _variant(*variant):
        clock = time.perf_counter(), time.process_time()
        sources = load_source_datasets(volume, files)
        seg = write_segmentation(volume, sources, labels, specs, out / "seg.dcm", uid_key="bench")
        parts["SEG (BINARY)"] = time.perf_counter() - clock[0]
        parts["SEG CPU"] = time.process_time() - clock[1]
        start = time.perf_counter()
        volumes = segment_volumes_ml(labels, len(specs), volume.geometry.voxel_volume_ml)
        write_volume_report(seg, volumes, out / "sr.dcm", "bench")
        parts["SR"] = time.perf_counter() - start
        start = time.perf_counter()
        write_preview_sc(volume, sources, labels, colors, out / "preview-sc.dcm", uid_key="bench")
        parts["preview SC"] = time.perf_counter() - start
        start = time.perf_counter()
        render_preview(volume.array, labels, colors, out / "preview.png", modality=volume.modality)
        parts["preview PNG"] = time.perf_counter() - start
    parts["frames"] = float(seg.NumberOfFrames)
    return parts


def stage_peaks_mb(volume: Volume, files: list[Path], labels: np.ndarray, out: Path, variant: tuple) -> tuple:
    """Most memory (Python and numpy, tracemalloc) allocated above the start: the whole stage, the SEG file write."""
    peaks = {"stage": 0, "write": 0}

    def traced(dataset: pydicom.Dataset, path: Path) -> None:
        before, peaks["stage"] = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        variant[0](dataset, path)
        peaks["write"] = tracemalloc.get_traced_memory()[1] - before

    tracemalloc.start()
    try:
        stage_once(volume, files, labels, out, (traced, variant[1]))
        peaks["stage"] = max(peaks["stage"], tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    return peaks["stage"] / 1e6, peaks["write"] / 1e6


def file_writes(volume: Volume, files: list[Path], labels: np.ndarray, out: Path, runs: int) -> list[str]:
    """Per SEG type: the file written by ``save_as`` and by the streamed writer (fastest CPU s), and whether equal."""
    specs = [segment_spec(label) for label in load_registry().datasets[STAGE_LABELS].labels.values()]
    sources = load_source_datasets(volume, files)
    rows = []
    for seg_type in SegType:
        seg = write_segmentation(volume, sources, labels, specs, out / "seg.dcm", uid_key="bench", seg_type=seg_type)
        seconds = {}
        for name, (save, _) in VARIANTS.items():
            cpu = []
            for _ in range(runs):
                start = time.process_time()
                save(seg, out / f"{name}.dcm")
                cpu.append(time.process_time() - start)
            seconds[name] = min(cpu)
        same = (out / "before.dcm").read_bytes() == (out / "after.dcm").read_bytes()
        size = (out / "after.dcm").stat().st_size / 1e6
        rows.append(
            f"| {seg_type.value} | {int(seg.NumberOfFrames)} | {size:.1f} | {seconds['before']:.2f} | "
            f"{seconds['after']:.2f} | {'yes' if same else '**no**'} |"
        )
    return rows


def run_stage(study: Path, runs: int, out_md: Path, command: str) -> str:
    """Time the write stage with each SEG writer, alternating, in one process; write the section."""
    files = sorted((study / "dicom").glob("*.dcm"))
    volume = read_series(files)
    truth = np.asarray(nib.load(study / "truth.nii.gz").dataobj).transpose(2, 1, 0)
    labels = np.where(truth == 7, 1, truth).astype(np.uint8)  # the demo label set counts the tumour as liver
    times: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-seg-stage-") as work:
        for variant in VARIANTS.values():  # warm-up: imports, registry, first-call caches
            stage_once(volume, files, labels, Path(work), variant)
        for _ in range(runs):
            for name, variant in VARIANTS.items():
                times[name].append(stage_once(volume, files, labels, Path(work), variant))
        peaks = {name: stage_peaks_mb(volume, files, labels, Path(work), v) for name, v in VARIANTS.items()}
        writes = file_writes(volume, files, labels, Path(work), runs)
    section = _stage_table(times, peaks, volume.geometry.shape, int(times["after"][0]["frames"]), command)
    section += "\n".join(["", *_FILE_WRITE_HEADER, *writes]) + "\n"
    _replace_section(out_md, STAGE_HEADING, section)
    return section


def _stage_table(times: dict, peaks: dict, shape: tuple, frames: int, command: str) -> str:
    parts = ["SEG (BINARY)", "SEG CPU", "SR", "preview SC", "preview PNG"]
    lines = [
        STAGE_HEADING,
        "",
        f"* command: `{command}`; {datetime.now().isoformat(timespec='seconds')}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; glibc keeps freed memory (`retain_freed_memory`, as the node)",
        f"* study: phantom CT {shape[0]} x {shape[1]} x {shape[2]}, six organs, BINARY SEG of {frames} frames",
        "* before: pydicom's `save_as`, label counts through a whole-map mask; after: the streamed writer "
        "(`dicom/streamwrite.py`), counts slab by slab; both in one process, alternating",
        "* fastest of the runs (seconds); peak = most memory allocated "
        "above the start of the stage / of the SEG file write (tracemalloc, a separate run)",
        "",
        "| part | before | after | runs (before) | runs (after) |",
        "|---|---|---|---|---|",
    ]
    for part in parts:
        before = [t[part] for t in times["before"]]
        after = [t[part] for t in times["after"]]
        runs = [" / ".join(f"{v:.2f}" for v in values) for values in (before, after)]
        lines.append(f"| {part} | {min(before):.2f} | {min(after):.2f} | {runs[0]} | {runs[1]} |")
    total = {w: min(sum(t[p] for p in parts if p != "SEG CPU") for t in times[w]) for w in times}
    lines.append(f"| **stage** (SEG, SR, SC, PNG) | **{total['before']:.2f}** | **{total['after']:.2f}** | | |")
    lines.append(f"| peak allocated, stage (MB) | {peaks['before'][0]:.0f} | {peaks['after'][0]:.0f} | | |")
    lines.append(f"| peak allocated, SEG file write (MB) | {peaks['before'][1]:.0f} | {peaks['after'][1]:.0f} | | |")
    return "\n".join(lines) + "\n"


_FILE_WRITE_HEADER = [
    "The SEG file alone, per type (the same data set written both ways; CPU seconds, fastest run):",
    "",
    "| type | frames | size MB | pydicom `save_as` | streamed | same bytes |",
    "|---|---|---|---|---|---|",
]


def _replace_section(path: Path, heading: str, section: str) -> None:
    """Put ``section`` at the end of ``path`` in place of an earlier one under the same heading."""
    text = path.read_text() if path.exists() else ""
    kept = text.split(heading)[0].rstrip()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((kept + "\n\n" if kept else "") + section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 x 64 x 64 (seconds; for the test suite)")
    parser.add_argument("--slices", type=int, help="default 300 (16 with --quick)")
    parser.add_argument("--size", type=int, help="rows = columns; default 512 (64 with --quick)")
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--out", type=Path, help="markdown file (default bench/results/seg.md, seg-quick.md)")
    parser.add_argument("--keep", type=Path, help="keep the source series and the SEGs in this folder")
    parser.add_argument("--stage", action="store_true", help="time the node's write stage, before/after (see below)")
    parser.add_argument(
        "--study", type=Path, help="--stage: a written phantom (dicom/, truth.nii.gz); default: make one"
    )
    parser.add_argument("--runs", type=int, default=3, help="--stage: runs per writer (default 3)")
    args = parser.parse_args(argv)
    command = "python bench/bench_seg.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    retain_freed_memory()  # as the node does: measure the work, not the VM's first-touch page faults
    if args.stage:
        return _stage_main(args, command)
    slices = args.slices or (16 if args.quick else 300)
    size = args.size or (64 if args.quick else 512)
    if slices < 4 or size < 16 or not 1 <= args.segments <= 15:
        parser.error("need --slices >= 4, --size >= 16, 1 <= --segments <= 15")
    out_md = args.out or ROOT / "results" / ("seg-quick.md" if args.quick else "seg.md")
    shape = (slices, size, size)

    work = Path(tempfile.mkdtemp(prefix="bench-seg-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"writing a {shape} CT series to {work} ...", file=sys.stderr)
        volume, files = write_source(work / "source", shape)
        labels = ellipsoid_labels(shape, args.segments)
        specs = segment_specs(args.segments)
        inputs, meta = dcmqi_inputs(labels, volume.geometry, specs, work / "dcmqi-input")
        # Warm-up on a tiny series: first-call costs (imports, caches) are not encoding time.
        small, small_files = write_source(work / "warmup", (4, 32, 32))
        run_ours(small, small_files, ellipsoid_labels(small.geometry.shape, args.segments), specs, work / "warmup")
        print("encoding ...", file=sys.stderr)
        rows = run_ours(volume, files, labels, specs, work)
        rows += run_dcmqi(inputs, meta, work / "source", work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    ours_binary = next(r for r in rows if r.seg_type == "BINARY")
    dcmqi_binary = next(r for r in rows if r.seg_type == "BINARY" and r.writer.startswith("dcmqi"))
    if ours_binary.frames != dcmqi_binary.frames:  # both omit empty frames: the counts must agree
        print(f"warning: {ours_binary.frames} BINARY frames vs dcmqi's {dcmqi_binary.frames}", file=sys.stderr)
    report = table(rows, shape, args.segments, command)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    stage = out_md.read_text().partition(STAGE_HEADING)[1:] if out_md.exists() else ("", "")
    out_md.write_text(report + ("\n" + "".join(stage) if stage[0] else ""))  # keep the write-stage section
    print(report)
    return 0


def _stage_main(args: argparse.Namespace, command: str) -> int:
    """``--stage``: the write-stage section of bench/results/seg.md (a 300 x 512² phantom unless --study)."""
    out_md = args.out or ROOT / "results" / "seg.md"
    if args.study is not None:
        print(run_stage(args.study, args.runs, out_md, command))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-seg-study-") as work:
        slices, size = args.slices or (16 if args.quick else 300), args.size or (64 if args.quick else 512)
        print(f"writing a {slices} x {size}² phantom CT to {work} ...", file=sys.stderr)
        write_phantom(make_phantom("CT", seed=11, slices=slices, size=size), work)
        print(run_stage(Path(work), args.runs, out_md, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
