"""Print how many shapes-world scenes one core generates per second.

Run: python benchmarks/bench_scenes.py [n]
"""

from __future__ import annotations

import sys
import time

from attnlab.shapes import make_scene


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    make_scene(0)  # builds the noise bank once, outside the timing
    start = time.perf_counter()
    for seed in range(n):
        make_scene(seed)
    elapsed = time.perf_counter() - start
    print(f"{n} scenes in {elapsed:.2f} s: {n / elapsed:.0f} scenes/s ({1e6 * elapsed / n:.0f} us/scene)")


if __name__ == "__main__":
    main()
