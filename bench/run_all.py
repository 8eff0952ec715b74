"""Every benchmark of the project in one command -> ``bench/results/SUMMARY.md``.

    python bench/run_all.py            # full sizes: tens of minutes on 2 cores; run it once
    python bench/run_all.py --quick    # small sizes, minutes -> bench/results/SUMMARY-quick.md
    python bench/run_all.py --only routing-public,routing-heldout   # a few: -> SUMMARY-partial.md (and routing.md)
    python bench/run_all.py --routing-benchmark PATH   # default ../shared/benchmarks/... beside the repo

Runs, one after the other (2 cores: never two at once), each in its own
process and each with its peer measured in the same run:

=================  ==========================================================  ===========================
key                what                                                        peer
=================  ==========================================================  ===========================
routing-public     ``medsegagent bench routing`` on the public 343-query set   the paper's expected models
routing-dev        the same on the development set (``routing_dev.jsonl``)     expected models
routing-dev-blind  the same on the blind dev set (``routing_dev_blind``)       expected models
routing-dev-blind2 the same on the second blind dev set (``routing_dev_blind2``) expected models
routing-dev-blind3 the same on the third blind dev set (``routing_dev_blind3``)  expected models
routing-dev-blind4 the same on the fourth blind dev set (``routing_dev_blind4``)  expected models
routing-dev-blind5 the same on the fifth blind dev set (``routing_dev_blind5``)  expected models
routing-dev-blind6 the same on the sixth blind dev set (``routing_dev_blind6``)  expected models
routing-dev-blind7 the same on the seventh blind dev set (``routing_dev_blind7``) expected models
routing-dev-blind8 the same on the eighth blind dev set (``routing_dev_blind8``)  expected models
routing-dev-blind9 the same on the ninth blind dev set (``routing_dev_blind9``)   expected models
routing-dev-blind10 the same on the tenth blind dev set (``routing_dev_blind10``) expected models
routing-dev-blind11 the same on the eleventh blind dev set (``routing_dev_blind11``) expected models
routing-heldout    the same on the frozen held-out set (``tests/data/heldout``)  expected models
ingest             C-STORE into the node (durable) vs DCMTK ``storescp``       DCMTK storescp
seg                DICOM-SEG encode vs dcmqi ``itkimage2segimage``             dcmqi
node               end-to-end overhead per study, everything but model time    (split of one study)
ensemble           Dice of each demo model vs the rank-aware ensemble          the single models
segment            ``segment`` wall time and peak memory on a large study      (stages)
real               Colin27 skull-stripped through the node; real CT to SEG       each package alone
throughput         studies/hour with 1 and 2 executors                         in-process vs Ray
=================  ==========================================================  ===========================

The summary has one row per benchmark (headline figures, wall time, the
peak resident memory of its largest process, the command that reproduces
it), then each benchmark's own tables.  The routing sets are reported
side by side in one table (also written to ``bench/results/routing.md``):
the public and development sets are scored within ``medsegagent-23`` (the
library they were written for), the held-out set over every registry dataset
(what a default ``medsegagent plan`` routes over).  The held-out set is
frozen: its table gives aggregates per category, never its misses.  A benchmark that fails is reported
as failed; the others still run, and the exit status says so.
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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PUBLIC = REPO.parent / "shared" / "benchmarks" / "medsegagent-model-selection-343.jsonl"
#: The development set (the router's own requests); the older hand-written set until it exists.
DEV = REPO / "tests" / "data" / "routing_dev.jsonl"
DEV_FALLBACK = REPO / "tests" / "data" / "routing_requests.jsonl"
HELDOUT = REPO / "tests" / "data" / "heldout" / "requests.jsonl"
DEV_ALL = REPO / "tests" / "data" / "routing_dev_all.jsonl"
#: Written without sight of the rules, but open to the router's engineers (not frozen).
DEV_BLIND = REPO / "tests" / "data" / "routing_dev_blind" / "requests.jsonl"
#: The second blind set, from other phrasing sources; open like the first (round nine).
DEV_BLIND2 = REPO / "tests" / "data" / "routing_dev_blind2" / "requests.jsonl"
#: The third blind set (session seven), weighted to the held-out set's weakest categories.
DEV_BLIND3 = REPO / "tests" / "data" / "routing_dev_blind3" / "requests.jsonl"
#: The fourth (session eight): not tuned on in the session it was written, to measure that round.
DEV_BLIND4 = REPO / "tests" / "data" / "routing_dev_blind4" / "requests.jsonl"
#: The fifth (session nine): tuned on its even rows only, its odd rows held back as the round's measure.
DEV_BLIND5 = REPO / "tests" / "data" / "routing_dev_blind5" / "requests.jsonl"
#: The sixth (session ten): never opened by the router engineer; the measure of round seventeen.
DEV_BLIND6 = REPO / "tests" / "data" / "routing_dev_blind6" / "requests.jsonl"
#: The seventh (session eleven): the measure of rounds nineteen and twenty; opened for round twenty-one.
DEV_BLIND7 = REPO / "tests" / "data" / "routing_dev_blind7" / "requests.jsonl"
#: The eighth (session twelve): the measure of rounds twenty-one to twenty-three; opened for round twenty-four.
DEV_BLIND8 = REPO / "tests" / "data" / "routing_dev_blind8" / "requests.jsonl"
#: The ninth (session fourteen): the measure of round twenty-four; opened for round twenty-five.
DEV_BLIND9 = REPO / "tests" / "data" / "routing_dev_blind9" / "requests.jsonl"
#: The tenth (session fifteen): the measure of round twenty-five; opened for round twenty-six.
DEV_BLIND10 = REPO / "tests" / "data" / "routing_dev_blind10" / "requests.jsonl"
#: The eleventh (session sixteen): never opened by the router engineer; the measure of round twenty-six on.
DEV_BLIND11 = REPO / "tests" / "data" / "routing_dev_blind11" / "requests.jsonl"
ROUTING_KEYS = (
    "routing-public",
    "routing-dev",
    "routing-dev-all",
    "routing-dev-blind",
    "routing-dev-blind2",
    "routing-dev-blind3",
    "routing-dev-blind4",
    "routing-dev-blind5",
    "routing-dev-blind6",
    "routing-dev-blind7",
    "routing-dev-blind8",
    "routing-dev-blind9",
    "routing-dev-blind10",
    "routing-dev-blind11",
    "routing-heldout",
)


@dataclass
class Bench:
    """One benchmark: how to run it at full and quick size, and what it is compared with."""

    key: str
    title: str
    peer: str
    full: list[str]
    quick: list[str]
    headline: str = ""
    output: str = ""
    status: str = "not run"
    wall_s: float = 0.0
    peak_mb: float = 0.0
    extra: dict = field(default_factory=dict)

    def argv(self, quick: bool) -> list[str]:
        """Arguments after the interpreter (``python``) or the ``medsegagent`` script."""
        return self.quick if quick else self.full


def _medsegagent() -> list[str]:
    script = Path(sys.executable).parent / "medsegagent"
    if script.exists():
        return [str(script)]
    found = shutil.which("medsegagent")
    return [found] if found else [sys.executable, "-m", "medsegagent.node.cli"]


def _routing(public: Path, dev: Path) -> list[Bench]:
    """The routing sets; each runs at the same size in full and quick runs."""
    heldout = HELDOUT.relative_to(REPO)
    sets = [
        ("routing-public", "Routing, public benchmark", public, ["--collection", "medsegagent-23"]),
        # the development set keeps the bench default (medsegagent-23) it was written for
        ("routing-dev", "Routing, development set", dev, []),
        # the second development set is written over the whole registry, like the held-out set
        (
            "routing-dev-all",
            "Routing, development set (whole registry)",
            DEV_ALL.relative_to(REPO),
            ["--collection", "all"],
        ),
        (
            "routing-dev-blind",
            "Routing, blind development set (whole registry)",
            DEV_BLIND.relative_to(REPO),
            ["--collection", "all"],
        ),
        (
            "routing-dev-blind2",
            "Routing, second blind development set (whole registry)",
            DEV_BLIND2.relative_to(REPO),
            ["--collection", "all"],
        ),
        (
            "routing-dev-blind3",
            "Routing, third blind development set (whole registry)",
            DEV_BLIND3.relative_to(REPO),
            ["--collection", "all"],
        ),
        (
            "routing-dev-blind4",
            "Routing, fourth blind development set (whole registry)",
            DEV_BLIND4.relative_to(REPO),
            ["--collection", "all"],
        ),
        (
            "routing-dev-blind5",
            "Routing, fifth blind development set (whole registry)",
            DEV_BLIND5.relative_to(REPO),
            ["--collection", "all"],
        ),
        (
            "routing-dev-blind6",
            "Routing, sixth blind development set (whole registry)",
            DEV_BLIND6.relative_to(REPO),
            ["--collection", "all"],
        ),
        (
            "routing-dev-blind7",
            "Routing, seventh blind development set (whole registry)",
            DEV_BLIND7.relative_to(REPO),
            ["--collection", "all"],
        ),
        (
            "routing-dev-blind8",
            "Routing, eighth blind development set (whole registry)",
            DEV_BLIND8.relative_to(REPO),
            ["--collection", "all"],
        ),
        (
            "routing-dev-blind9",
            "Routing, ninth blind development set (whole registry)",
            DEV_BLIND9.relative_to(REPO),
            ["--collection", "all"],
        ),
        (
            "routing-dev-blind10",
            "Routing, tenth blind development set (whole registry)",
            DEV_BLIND10.relative_to(REPO),
            ["--collection", "all"],
        ),
        (
            "routing-dev-blind11",
            "Routing, eleventh blind development set (whole registry)",
            DEV_BLIND11.relative_to(REPO),
            ["--collection", "all"],
        ),
        ("routing-heldout", "Routing, held-out set (frozen)", heldout, ["--collection", "all"]),
    ]
    out = []
    for key, title, path, collection in sets:
        argv = ["medsegagent", "bench", "routing", str(path), *collection, "--json"]
        out.append(Bench(key, title, "expected datasets of the set", argv, argv))
    return out


def benchmarks(public: Path) -> list[Bench]:
    """The project's benchmarks with their full and quick command lines."""
    py = "python"
    dev = (DEV if DEV.is_file() else DEV_FALLBACK).relative_to(REPO)
    return [
        *_routing(public, dev),
        Bench("ingest", "Ingest (C-STORE) vs DCMTK storescp", "DCMTK storescp",
              [py, "bench/bench_ingest.py"], [py, "bench/bench_ingest.py", "--quick"]),
        Bench("seg", "DICOM-SEG encode vs dcmqi", "dcmqi itkimage2segimage",
              [py, "bench/bench_seg.py"], [py, "bench/bench_seg.py", "--quick"]),
        Bench("node", "End-to-end overhead per study", "the study's own model time",
              [py, "bench/bench_node.py"], [py, "bench/bench_node.py", "--size", "64", "--slices", "24"]),
        Bench("ensemble", "Ensemble vs single models (Dice)", "each demo model alone",
              [py, "bench/bench_ensemble.py"],
              [py, "bench/bench_ensemble.py", "--modality", "CT", "--phantoms", "1", "--size", "64", "--slices", "32",
               "--out", "bench/results/ensemble-quick.md"]),
        Bench("segment", "segment: wall time and peak memory", "stages of the same run",
              [py, "bench/bench_segment.py"], [py, "bench/bench_segment.py", "--quick"]),
        Bench("real", "Real models on real scans (Colin27, Siemens CT)", "each brain model's package alone",
              [py, "bench/bench_real.py"], [py, "bench/bench_real.py", "--only", "ct",
                                            "--out", "bench/results/real-quick.md"]),
        Bench("throughput", "Throughput, 1 and 2 executors", "in-process vs Ray",
              [py, "bench/bench_throughput.py", "--json", "bench/results/throughput.json"],
              [py, "bench/bench_throughput.py", "--quick", "--json", "bench/results/throughput-quick.json"]),
    ]  # fmt: skip


def _run(bench: Bench, quick: bool, timeout: float) -> None:
    """Run one benchmark in its own process; record output, wall time and its largest process's peak RSS."""
    argv = bench.argv(quick)
    command = _medsegagent() + argv[1:] if argv[0] == "medsegagent" else [sys.executable, *argv[1:]]
    if bench.key in ROUTING_KEYS and not (REPO / argv[3]).is_file():
        hint = " (pass --routing-benchmark)" if bench.key == "routing-public" else ""
        bench.status = f"skipped: {argv[3]} not found{hint}"
        return
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # The tools the test extra installs (dcmqi, dciodvfy) live beside the interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = Path(tempfile.gettempdir()) / f"medsegagent-bench-{bench.key}.log"  # its stderr (kept when it fails)
    t0 = time.perf_counter()
    chunks: list[str] = []
    with log.open("w") as err:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        # wait4, not wait: its rusage is this benchmark's own (largest process among it and its children).
        _, status, usage = os.wait4(proc.pid, 0)
        killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join()
    bench.wall_s = time.perf_counter() - t0
    bench.peak_mb = usage.ru_maxrss / 1024.0
    bench.output = "".join(chunks).strip()
    out = bench.output
    if bench.wall_s >= timeout:
        bench.status = f"timed out after {timeout:.0f} s"
        return
    if proc.returncode != 0:
        if out and not bench.key.startswith("routing"):
            # It ran and printed its tables, but its own acceptance checks failed (bench_ensemble does this).
            bench.status = f"exit {proc.returncode}: its own checks did not all hold (see its tables)"
            return
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        bench.status = f"failed (exit {proc.returncode}; log {log}): {' / '.join(tail)[-300:]}"
        return
    bench.status = "ok"
    log.unlink(missing_ok=True)
    if bench.key.startswith("routing"):
        data = json.loads(out)
        bench.extra = data
        negatives = "" if data.get("negatives_correct") is None else f", negatives {data['negatives_correct']:.3f}"
        bench.headline = (
            f"hit {data['hit_rate']:.3f}, strict {data['strict']:.3f}, soft {data['soft']:.3f}{negatives};"
            f" p50 {data['p50_ms']:.1f} ms, p95 {data['p95_ms']:.1f} ms (n={data['n']})"
        )
    elif bench.key == "throughput":
        path = REPO / argv[argv.index("--json") + 1]
        rows = json.loads(path.read_text())["rows"]
        bench.headline = "; ".join(
            f"{'in-process' if r['kind'] == 'inprocess' else 'Ray'} x{r['lanes']}: "
            + (f"{r['per_hour']:.0f}/h, {r['peak_pss_mb']:.0f} MB" if "per_hour" in r else "failed")
            for r in rows
        )


def routing_table(benches: list[Bench]) -> str:
    """Every routing set side by side, then the held-out and third blind sets per category."""
    lines = [
        "| set | file | collection | queries | strict | hit rate | soft | negatives correct | p50 ms | p95 ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in benches:
        if b.key not in ROUTING_KEYS:
            continue
        d, path = b.extra, b.argv(False)[3]
        if b.status != "ok":
            lines.append(f"| {b.title} | `{path}` | | | {b.status} | | | | | |")
            continue
        neg = "n/a" if d.get("negatives_correct") is None else f"{d['negatives_correct']:.3f} (of {d['negatives']})"
        lines.append(
            f"| {b.title} | `{path}` | {d['collection'] or 'all'} | {d['n']} | {d['strict']:.3f} | {d['hit_rate']:.3f}"
            f" | {d['soft']:.3f} | {neg} | {d['p50_ms']:.2f} | {d['p95_ms']:.2f} |"
        )
    lines += _category_table(benches)
    return "\n".join(lines)


#: Sets whose rows carry a category: the frozen held-out set and the blind sets written alongside it.
_CATEGORY_SETS = (
    ("routing-heldout", "held-out"),
    ("routing-dev-blind3", "blind3"),
    ("routing-dev-blind4", "blind4"),
    ("routing-dev-blind5", "blind5"),
    ("routing-dev-blind6", "blind6"),
    ("routing-dev-blind7", "blind7"),
    ("routing-dev-blind8", "blind8"),
    ("routing-dev-blind9", "blind9"),
    ("routing-dev-blind10", "blind10"),
    ("routing-dev-blind11", "blind11"),
)


def _category_table(benches: list[Bench]) -> list[str]:
    """Held-out and the third to eleventh blind sets per category, side by side (aggregates only)."""
    done = {b.key: b.extra["by_category"] for b in benches if b.status == "ok" and b.extra.get("by_category")}
    sets = [(key, name) for key, name in _CATEGORY_SETS if key in done]
    if not sets:
        return []
    lines = ["", "Per category (aggregates only; the held-out set is frozen, its misses are not read):", ""]
    lines.append("| category | " + " | ".join(f"{n} queries | {n} strict | {n} hit rate" for _, n in sets) + " |")
    lines.append("|---|" + "---:|---:|---:|" * len(sets))
    for category in sorted({c for key, _ in sets for c in done[key]}):
        cells = []
        for key, _ in sets:
            c = done[key].get(category)
            cells.append(f"{c['n']} | {c['strict']:.3f} | {c['hit_rate']:.3f}" if c else " | | ")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return lines


def _machine() -> str:
    memory = ""
    try:
        with open("/proc/meminfo") as info:
            memory = f", {int(info.readline().split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores{memory}, Python {platform.python_version()}, CPU only"


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return rev.stdout.strip() + (" (with local changes)" if dirty.strip() else "")
    except OSError:
        return "unknown"


def write_summary(benches: list[Bench], quick: bool, out: Path, total_s: float) -> str:
    """The markdown summary: one row per benchmark, then each benchmark's own tables."""
    suffix = " --quick" if quick else ""
    lines = [
        "# Benchmarks" + (" (quick sizes)" if quick else ""),
        "",
        f"* command: `python bench/run_all.py{suffix}` ({total_s / 60:.1f} min in all)",
        f"* date: {time.strftime('%Y-%m-%dT%H:%M:%S')}; commit {_commit()}",
        f"* machine: {_machine()}; shared and noisy, so each figure is compared with its peer from the same run",
        "* peak RSS: resident memory of the benchmark's largest single process (itself or one it started and"
        " waited for), from wait4(); the throughput table gives whole-tree memory (PSS) including Ray's processes",
        "",
        "| benchmark | peer (same run) | headline | status | wall s | peak RSS MB | reproduce |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in benches:
        argv = b.argv(quick)
        command = " ".join(argv)
        lines.append(
            f"| {b.title} | {b.peer} | {b.headline or 'see below'} | {b.status} | {b.wall_s:.0f} | {b.peak_mb:.0f}"
            f" | `{command}` |"
        )
    if any(b.key in ROUTING_KEYS for b in benches):
        lines += ["", "## Routing: public, development and held-out sets", "", routing_table(benches)]
    for b in benches:
        if b.key in ROUTING_KEYS:
            continue
        lines += ["", f"## {b.title}", "", f"`{' '.join(b.argv(quick))}` -- {b.status}", ""]
        if b.output:
            # The benchmark's own markdown: drop its top-level title, keep its tables and notes.
            body = [line for line in b.output.splitlines() if not line.startswith("# ")]
            lines.append("\n".join(body).strip())
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def write_routing(benches: list[Bench], out: Path) -> None:
    """``bench/results/routing.md``: the routing table with the commands that reproduce it."""
    commands = [f"* `{' '.join(b.argv(False))}`" for b in benches if b.key in ROUTING_KEYS]
    text = "\n".join(
        [
            "# Routing: public, development and held-out sets",
            "",
            f"* command: `python bench/run_all.py --only {','.join(ROUTING_KEYS)}`",
            f"* date: {time.strftime('%Y-%m-%dT%H:%M:%S')}; commit {_commit()}",
            f"* machine: {_machine()}",
            "* latency: per query after start-up (registry, router, encoder warm-up), one process per set",
            *commands,
            "",
            routing_table(benches),
        ]
    )
    out.write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and write the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes), for a smoke run")
    parser.add_argument("--routing-benchmark", type=Path, default=PUBLIC, help=f"public routing set (default {PUBLIC})")
    parser.add_argument("--only", help="comma-separated keys (default: all)")
    parser.add_argument("--out", type=Path, help="summary file (default bench/results/SUMMARY[-quick][-partial].md)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
    args = parser.parse_args(argv)
    public = Path(os.path.relpath(args.routing_benchmark.resolve(), REPO))  # shown as typed from the repo root
    benches = benchmarks(public)
    if args.only:
        keys = {k.strip() for k in args.only.split(",")}
        unknown = keys - {b.key for b in benches}
        if unknown:
            parser.error(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(b.key for b in benches)}")
        benches = [b for b in benches if b.key in keys]
    # A partial run (--only) does not overwrite the full summary with a few rows.
    out = args.out or RESULTS / f"SUMMARY{'-quick' if args.quick else ''}{'-partial' if args.only else ''}.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for bench in benches:
        print(f"== {bench.key}: {' '.join(bench.argv(args.quick))}", file=sys.stderr, flush=True)
        _run(bench, args.quick, args.timeout)
        print(f"   {bench.status} in {bench.wall_s:.0f} s {bench.headline}", file=sys.stderr, flush=True)
    print(write_summary(benches, args.quick, out, time.perf_counter() - t0))
    print(f"wrote {out}", file=sys.stderr)
    if any(b.key in ROUTING_KEYS and b.status == "ok" for b in benches):
        write_routing(benches, RESULTS / "routing.md")
        print(f"wrote {RESULTS / 'routing.md'}", file=sys.stderr)
    # A benchmark whose own checks did not hold still produced its figures; only crashes and timeouts fail the run.
    return 1 if any(b.status.startswith(("failed", "timed out")) for b in benches) else 0


if __name__ == "__main__":
    sys.exit(main())
