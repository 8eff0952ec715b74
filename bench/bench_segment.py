"""Benchmark: wall time and peak memory of ``segment`` on a large CT study with two models.

The study is a synthetic CT phantom (``--slices`` x ``--size`` x ``--size``,
default 300 x 512 x 512) written as single-frame DICOM once and reused
(``--study``).  A fresh Python process then runs
:func:`medsegagent.node.pipeline.segment_folder` on it -- the registry's two
demo CT models for six organs -- twice: cold
(imports, model loading) and warm (models cached, as in the node).  A thread
samples the process's resident memory (``/proc/self/status``) every 10 ms;
the pipeline's progress lines mark the stages:

* ``read``: scan the folder, read the series into a volume;
* ``plan``: route the request;
* ``inference``: both models in parallel, each preprocessing (foreground,
  model grid, intensity), running its network and keeping its probabilities
  on its own grid (per-model seconds in the table);
* ``ensemble``: resampling each member's labels to the source grid inside
  their support boxes, fusing, resolving overlaps;
* ``write``: DICOM-SEG (+ preview, report).

    python bench/bench_segment.py                      # 300 x 512 x 512 -> bench/results/segment.md
    python bench/bench_segment.py --quick              # 48 x 128 x 128 in seconds -> segment-quick.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from medsegagent.node.memory import resident_mb

REQUEST = "liver, spleen, both kidneys, pancreas and aorta"
STAGES = ("read", "plan", "inference", "ensemble", "write")


class MemorySampler:
    """Peak resident memory per stage, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.stage = "start"
        self.peaks: dict[str, float] = {}
        self.started: dict[str, float] = {}
        #: CPU seconds of the process (all threads) per stage: what a stage costs, whatever else runs.
        self.cpu: dict[str, float] = {}
        self._cpu_at = time.process_time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = resident_mb()
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss)
            time.sleep(self.interval)

    def mark(self, stage: str) -> None:
        """Start ``stage`` (the sample at the boundary counts for both)."""
        rss = resident_mb()
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss)
        now = time.process_time()
        self.cpu[self.stage] = self.cpu.get(self.stage, 0.0) + now - self._cpu_at
        self._cpu_at = now
        self.stage = stage
        self.started[stage] = time.perf_counter()
        self.peaks[stage] = max(self.peaks.get(stage, 0.0), rss)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_study(folder: Path, size: int, slices: int) -> dict:
    """Child: write the phantom study (once)."""
    from medsegagent.dicom.image_writer import write_phantom
    from medsegagent.dicom.phantom import make_phantom

    t0 = time.perf_counter()
    phantom = make_phantom("CT", seed=11, slices=slices, size=size, orientation="axial")
    t_make = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_phantom(phantom, folder)
    return {"make_s": t_make, "write_s": time.perf_counter() - t0, "volumes_ml": phantom.volumes_ml()}


def run_segment(study: Path, out: Path, runs: int) -> dict:
    """Child: segment the study ``runs`` times in this process (first cold, then warm)."""
    stage_of = {"reading": "read", "series": "plan", "running": "inference", "ensemble:": "ensemble"}
    stage_of["writing"] = "write"
    results = []
    with MemorySampler() as sampler:
        sampler.mark("imports")
        from medsegagent.models.executor import InProcessExecutor, ModelCache
        from medsegagent.models.registry import load_registry
        from medsegagent.node.pipeline import RunContext, segment_folder

        executor = InProcessExecutor(ModelCache(), workers=2)
        registry = load_registry()
        for run in range(runs):
            sampler.peaks, sampler.cpu = {}, {}

            def progress(message: str) -> None:
                stage = stage_of.get(message.split(" ", 1)[0])
                if stage:
                    sampler.mark(stage)

            t0 = time.perf_counter()
            context = RunContext(registry, executor, progress=progress)
            result = segment_folder(study / "dicom", REQUEST, out / f"run{run}", context, collection="demo")
            total = time.perf_counter() - t0
            sampler.mark("done")
            report = result.report
            results.append(
                {
                    "total_s": total,
                    "timings_s": report["timings_s"],
                    "peak_rss_mb": {k: v for k, v in sampler.peaks.items() if k in STAGES},
                    "cpu_s": {k: v for k, v in sampler.cpu.items() if k in STAGES},
                    "models": report["models"],
                    "segments": {s["label"]: s["volume_ml"] for s in report["segments"]},
                    "shape": report["series"]["shape"],
                }
            )
    return {"runs": results}


def _child(argv: list[str], timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {argv[0]} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(made: dict | None, runs: list[dict], args: argparse.Namespace) -> list[str]:
    shape = "x".join(map(str, runs[0]["shape"]))
    lines = [
        f"# `segment` on a {shape} CT phantom with two models",
        "",
        "`python bench/bench_segment.py" + (" --quick" if args.quick else "") + "`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, no GPU (CPU inference), python "
        f"{platform.python_version()}. Request: {REQUEST!r} (collection demo: "
        + " + ".join(m["name"] for m in runs[0]["models"])
        + ", run in parallel). Peak memory is the resident set of the segmenting process (sampled every 10 ms), "
        "which holds the models, the volume and everything else; the stage's peak is the highest value seen "
        "while it ran.",
        "",
    ]
    if made:
        lines += [f"Study made once: phantom {made['make_s']:.1f} s, DICOM write {made['write_s']:.1f} s.", ""]
    lines += ["| stage | " + " | ".join(f"run {i + 1} ({'cold' if i == 0 else 'warm'}) s" for i in range(len(runs)))]
    lines[-1] += " | CPU s " + " | ".join(f"run {i + 1}" for i in range(len(runs)))
    lines[-1] += " | peak RSS (MB) " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |"
    lines += ["|---|" + "---|" * (3 * len(runs))]
    for stage in STAGES:
        times = " | ".join(f"{r['timings_s'].get(stage, float('nan')):.2f}" for r in runs)
        cpu = " | ".join(f"{r['cpu_s'].get(stage, float('nan')):.2f}" for r in runs)
        peaks = " | ".join(f"{r['peak_rss_mb'].get(stage, float('nan')):.0f}" for r in runs)
        lines.append(f"| {stage} | {times} | {cpu} | {peaks} |")
    totals = " | ".join(f"**{r['total_s']:.2f}**" for r in runs)
    cpu_totals = " | ".join(f"**{sum(r['cpu_s'].values()):.2f}**" for r in runs)
    peak = " | ".join(f"**{max(r['peak_rss_mb'].values()):.0f}**" for r in runs)
    lines += [f"| total | {totals} | {cpu_totals} | {peak} |", ""]
    lines += [
        "Per model (seconds inside the parallel inference stage; `to_source` is spent in the ensemble stage):",
        "",
    ]
    keys = ("load", "preprocess", "inference", "postprocess", "to_source")
    lines += ["| run | model | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for i, r in enumerate(runs, start=1):
        for m in r["models"]:
            seconds = m.get("seconds", {})
            lines.append(f"| {i} | {m['name']} | " + " | ".join(f"{seconds.get(k, 0.0):.2f}" for k in keys) + " |")
    lines += ["", "Segment volumes (mL): " + ", ".join(f"{k} {v:.0f}" for k, v in runs[-1]["segments"].items()), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Command line (parent: makes the study once, then measures in a fresh process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="48 x 128 x 128")
    parser.add_argument("--runs", type=int, default=2, help="segment runs in one process (first is cold)")
    parser.add_argument("--study", type=Path, default=None, help="study folder (made if missing, then reused)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child-make", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-run", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_make:
        print(json.dumps(make_study(args.child_make, args.size, args.slices)))
        return 0
    if args.child_run:
        print(json.dumps(run_segment(args.child_run[0], args.child_run[1], args.runs)))
        return 0
    if args.quick:
        args.size, args.slices = 128, 48
    name = "segment-quick.md" if args.quick else "segment.md"
    out = args.out or Path(__file__).parent / "results" / name
    study = args.study or Path(tempfile.gettempdir()) / f"medsegagent-bench-ct-{args.slices}x{args.size}"
    made = None
    if not (study / "dicom").is_dir():
        print(f"writing the study to {study} ...", file=sys.stderr)
        made = _child(["--child-make", str(study), "--size", str(args.size), "--slices", str(args.slices)], 3600)
    with tempfile.TemporaryDirectory(prefix="medsegagent-bench-out-") as tmp:
        print("segmenting in a fresh process ...", file=sys.stderr)
        load_before = os.getloadavg()[0]
        measured = _child(["--child-run", str(study), tmp, "--runs", str(args.runs)], 3600)
        load_after = os.getloadavg()[0]
    lines = _table(made, measured["runs"], args)
    # Other work on the machine slows every stage; say how busy it was.
    lines += [f"Load average (1 min) before / after the measurement: {load_before:.1f} / {load_after:.1f}.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
