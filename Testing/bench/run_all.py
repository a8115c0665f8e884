"""``make bench``: every MedTL benchmark, each printing its table and writing JSON under
Testing/bench/results. Benchmarks print figures; they never pass or fail on a timing.

Arguments are passed to each benchmark (e.g. ``--quick`` for a smoke run).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "performance.py",  # MedTL's overhead: training, inference, the MRML bridge, peak memory
    "strategies.py",  # the transfer-learning strategy study (segmentation and classification)
    "adaptation.py",  # the domain-adaptation study (AdaBN, DSBN, DANN on simulated scanner shifts)
    "next_slice.py",  # "paint this slice next" against evenly spaced corrections on the demo CT
    "interactive.py",  # the warm engine's rounds against today's one-shot round: previews, time, Dice, planner
]


def main() -> int:
    status = 0
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        status |= subprocess.call([sys.executable, str(HERE / name), *sys.argv[1:]])
    return status


if __name__ == "__main__":
    raise SystemExit(main())
