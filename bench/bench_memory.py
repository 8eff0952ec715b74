"""What a study's fresh arrays cost to fill, with glibc's defaults and with retained memory.

    python bench/bench_memory.py [--mb 315] [--rounds 3] [--pause 8]

Each mode runs in a fresh process (``node.retain_memory`` is process-wide and
one-way).  A round allocates and fills an array the size of a study's volume
(315 MB: a 300 x 512² CT as float32), frees it, and waits ``--pause`` seconds,
as the node waits between studies; on a VM that reports free pages to its
host, that is when the host takes them back.  The table gives each round's
fill time: with the defaults every round faults fresh pages in, retained
memory reuses the first round's.  Writes ``bench/results/memory.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from medsegagent.node.memory import retain_freed_memory

RESULTS = Path(__file__).parent / "results" / "memory.md"
MODES = {"defaults": False, "retained": True}


def fill_rounds(mb: int, rounds: int, pause: float) -> list[float]:
    """Seconds to allocate and fill ``mb`` MB, once per round, freeing and pausing in between."""
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        array = np.empty(mb << 20, np.uint8)
        array.fill(1)
        seconds.append(time.perf_counter() - started)
        del array
        time.sleep(pause)
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Run both modes, each in its own process, and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=315)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pause", type=float, default=8.0, help="seconds between rounds (between studies)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if MODES[args.child] and not retain_freed_memory():
            raise SystemExit("glibc refused the settings: nothing to compare")
        print(json.dumps(fill_rounds(args.mb, args.rounds, args.pause)))
        return 0
    base = [sys.executable, __file__, "--mb", str(args.mb), "--rounds", str(args.rounds), "--pause", str(args.pause)]
    runs = {
        mode: json.loads(subprocess.run([*base, "--child", mode], check=True, stdout=subprocess.PIPE).stdout)
        for mode in MODES
    }
    rows = ["| allocator | " + " | ".join(f"round {i + 1} s" for i in range(args.rounds)) + " |",
            "|---|" + "---|" * args.rounds]  # fmt: skip
    rows += [f"| {mode} | " + " | ".join(f"{s:.3f}" for s in seconds) + " |" for mode, seconds in runs.items()]
    command = f"python bench/bench_memory.py --mb {args.mb} --rounds {args.rounds} --pause {args.pause:g}"
    table = "\n".join(
        [f"Allocate and fill {args.mb} MB, free it, wait {args.pause:g} s; {os.cpu_count()} cores, "
         f"load average {os.getloadavg()[0]:.1f}.", "", *rows, "", f"`{command}`"]
    )  # fmt: skip
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# Filling a study's fresh arrays\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
