"""Throughput in studies per hour with 1 and 2 executors, in-process against Ray, in one run.

    python bench/bench_throughput.py            # 6 studies of 48 x 128 x 128 -> bench/results/throughput.md
    python bench/bench_throughput.py --quick    # 3 studies of 24 x 64 x 64 -> bench/results/throughput-quick.md

``--studies`` synthetic CT phantoms (different seeds) are written once; then
each configuration segments all of them (``segment_study``, request
``--request`` in the ``demo`` collection: the demo CT models) in a fresh
process, so memory and start-up are its own:

* ``in-process x K`` -- K study workers (threads), each with its own
  :class:`~medsegagent.models.executor.InProcessExecutor` and model cache
  (two models of a study in parallel threads), as K node processors would;
* ``Ray x K`` -- K study workers sharing one
  :class:`~medsegagent.models.ray_executor.RayExecutor` on a private local
  Ray with K CPUs and K actors per model (each 0.5 CPU, so a study's models
  run in parallel), bound to 127.0.0.1.

Before the clock starts every worker segments one extra study (models loaded,
actors placed: the node keeps them so), reported as *warm-up*.  Studies per
hour = studies / wall time x 3600.  Peak memory is the proportional set size
(PSS, shared pages split between processes) summed over the process and all
its descendants -- Ray's GCS, raylet and model actors included -- sampled
every 0.2 s.  *labels* says whether every study's label map is identical to
the first configuration's.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REQUEST = "liver, spleen and both kidneys"
CONFIGS = (("inprocess", 1), ("inprocess", 2), ("ray", 1), ("ray", 2))


# -- memory -------------------------------------------------------------------------------------


def _tree(root: int) -> set[int]:
    """``root`` and all its descendants."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree and pid not in tree}
        tree |= children
        grew = bool(children)
    return tree


def _pss_mb(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class TreeMemory:
    """Peak PSS of this process and its descendants, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, sum(_pss_mb(pid) for pid in _tree(os.getpid())))

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _stop_session(folder: str, grace: float = 10.0) -> None:
    """Kill what is left of a Ray session under ``folder`` (agents exit a few seconds after their raylet)."""
    import shutil
    import signal

    def left() -> set[int]:
        pids = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                with contextlib.suppress(OSError):
                    for fd in os.listdir(f"/proc/{entry}/fd"):
                        with contextlib.suppress(OSError):
                            if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(folder + "/"):
                                pids.add(int(entry))
                                break
        return pids

    deadline = time.monotonic() + grace
    while left() and time.monotonic() < deadline:
        time.sleep(0.25)
    for pid in left():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


# -- child: one configuration --------------------------------------------------------------------


def make_studies(folder: Path, count: int, size: int, slices: int) -> list[Path]:
    """Write ``count + 1`` phantom CT studies (the first is the warm-up study)."""
    from medsegagent.dicom.image_writer import write_phantom
    from medsegagent.dicom.phantom import make_phantom

    dirs = []
    for i in range(count + 1):
        files = write_phantom(make_phantom("CT", seed=500 + i, slices=slices, size=size), folder / f"study{i}")
        dirs.append(files.dicom_dir)
    return dirs


def run_config(kind: str, lanes: int, studies: list[Path], out: Path) -> dict:
    """Segment ``studies[1:]`` with ``lanes`` workers (after a warm-up study each); timings and label hashes."""
    with TreeMemory() as memory:
        from medsegagent.models.executor import InProcessExecutor, ModelCache
        from medsegagent.models.registry import load_registry
        from medsegagent.models.routing import Router
        from medsegagent.node.pipeline import RunContext, read_study, segment_study

        registry = load_registry()
        router = Router(registry)
        temp = None
        if kind == "ray":
            from medsegagent.models.ray_executor import RayExecutor

            temp = tempfile.mkdtemp(prefix="msray", dir="/tmp")  # short: Ray's socket paths are limited
            shared = RayExecutor(
                num_cpus_per_model=0.5,
                replicas=lanes,
                local={"num_cpus": lanes, "object_store_mb": 300, "temp_dir": temp},
            )
            executors = [shared] * lanes
        else:
            executors = [InProcessExecutor(ModelCache(), workers=2) for _ in range(lanes)]

        def segment(executor, study: Path, name: str) -> tuple[float, str]:
            t0 = time.perf_counter()
            read = read_study(study)
            plan = router.plan(REQUEST, modality=read.modality, collection="demo")
            result = segment_study(read, plan, out / name, RunContext(registry, executor))
            return time.perf_counter() - t0, hashlib.sha1(result.labels.tobytes()).hexdigest()[:12]

        try:
            t0 = time.perf_counter()
            warm = [threading.Thread(target=segment, args=(e, studies[0], f"warm{i}")) for i, e in enumerate(executors)]
            for thread in warm:
                thread.start()
            for thread in warm:
                thread.join()
            warmup_s = time.perf_counter() - t0
            todo: queue.Queue[int] = queue.Queue()
            for i in range(1, len(studies)):
                todo.put(i)
            seconds: dict[int, float] = {}
            hashes: dict[int, str] = {}

            def lane(executor) -> None:
                while True:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    seconds[i], hashes[i] = segment(executor, studies[i], f"study{i}")

            t0 = time.perf_counter()
            threads = [threading.Thread(target=lane, args=(e,)) for e in executors]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - t0
        finally:
            for executor in set(executors):
                executor.close()
            if temp is not None:
                _stop_session(temp)
    n = len(studies) - 1
    return {
        "kind": kind,
        "lanes": lanes,
        "studies": n,
        "warmup_s": warmup_s,
        "wall_s": wall,
        "per_hour": n / wall * 3600.0 if len(seconds) == n else 0.0,
        "study_s": sum(seconds.values()) / max(1, len(seconds)),
        "peak_pss_mb": memory.peak_mb,
        "hashes": [hashes.get(i, "-") for i in range(1, len(studies))],
    }


# -- parent ---------------------------------------------------------------------------------------


def _label(kind: str, lanes: int) -> str:
    return f"{'in-process' if kind == 'inprocess' else 'Ray'} x {lanes}"


def main(argv: list[str] | None = None) -> int:
    """Run every configuration in its own process and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 studies of 24 x 64 x 64 (for a smoke run)")
    parser.add_argument("--studies", type=int, help="timed studies per configuration (default 6, 3 with --quick)")
    parser.add_argument("--size", type=int, help="rows = columns (default 128, 64 with --quick)")
    parser.add_argument("--slices", type=int, help="default 48 (24 with --quick)")
    parser.add_argument("--out", type=Path, help="markdown file (default bench/results/throughput[-quick].md)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "LANES", "STUDIES_JSON", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, lanes, studies, out = args.child
        dirs = [Path(p) for p in json.loads(studies)]
        print(json.dumps(run_config(kind, int(lanes), dirs, Path(out))))
        return 0
    count = args.studies or (3 if args.quick else 6)
    size = args.size or (64 if args.quick else 128)
    slices = args.slices or (24 if args.quick else 48)
    out_md = args.out or RESULTS / f"throughput{'-quick' if args.quick else ''}.md"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        root = Path(tmp)
        print(f"writing {count + 1} studies of {slices} x {size} x {size} ...", file=sys.stderr)
        dirs = make_studies(root / "studies", count, size, slices)
        for kind, lanes in CONFIGS:
            print(f"{_label(kind, lanes)} ...", file=sys.stderr)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", kind, str(lanes), json.dumps([str(d) for d in dirs]),
                 str(root / f"out-{kind}-{lanes}")],
                capture_output=True, text=True, timeout=3600,
            )  # fmt: skip
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                rows.append({"kind": kind, "lanes": lanes, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    reference = next((r["hashes"] for r in rows if "hashes" in r), None)
    command = "python bench/bench_throughput.py" + (" --quick" if args.quick else "")
    if args.studies or args.size or args.slices:
        command += "".join(f" --{k} {v}" for k, v in (("studies", args.studies), ("size", args.size),
                                                      ("slices", args.slices)) if v)  # fmt: skip
    lines = [
        "# Throughput: studies per hour, 1 and 2 executors, in-process vs Ray",
        "",
        f"* command: `{command}`",
        f"* date: {time.strftime('%Y-%m-%dT%H:%M:%S')}; machine: {platform.machine()}, {os.cpu_count()} cores,"
        f" Python {platform.python_version()}; CPU only",
        f"* {count} timed studies of {slices} x {size} x {size} CT per configuration (+1 warm-up study per worker);"
        f" request '{REQUEST}' (demo collection); each configuration in a fresh process",
        "* peak memory: PSS summed over the process and its descendants (Ray GCS, raylet, actors included)",
        "",
        "| configuration | studies/hour | wall s | mean s/study | warm-up s | peak memory MB | labels |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {_label(row['kind'], row['lanes'])} | failed: {' '.join(row['error'])} | | | | | |")
            continue
        same = "identical" if row["hashes"] == reference else "DIFFERENT"
        lines.append(
            f"| {_label(row['kind'], row['lanes'])} | {row['per_hour']:.0f} | {row['wall_s']:.1f}"
            f" | {row['study_s']:.1f} | {row['warmup_s']:.1f} | {row['peak_pss_mb']:.0f} | {same} |"
        )
    table = "\n".join(lines) + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(table)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print(table)
    print(f"wrote {out_md}", file=sys.stderr)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
