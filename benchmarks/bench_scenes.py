"""Print how many shapes-world scenes one core generates per second.

Run: PYTHONPATH=. python benchmarks/bench_scenes.py [scenes_per_repeat] [repeats]
Prints, per repeat, the wall-clock rate and the rate per second of this
process's CPU time (the two agree on an idle machine; on a busy one the CPU
rate is the fairer single-core figure), then the best and median of each.
"""

from __future__ import annotations

import statistics
import sys
import time

from attnlab.shapes import make_scene


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    make_scene(0)  # builds the noise bank once, outside the timing
    wall, cpu = [], []
    for rep in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for seed in range(rep * n, (rep + 1) * n):
            make_scene(seed)
        wall.append(n / (time.perf_counter() - w0))
        cpu.append(n / (time.process_time() - c0))
    print("wall scenes/s per repeat:", " ".join(f"{r:.0f}" for r in wall))
    print("cpu  scenes/s per repeat:", " ".join(f"{r:.0f}" for r in cpu))
    for name, rates in (("wall", wall), ("cpu", cpu)):
        best, median = max(rates), statistics.median(rates)
        print(f"{name}: best {best:.0f} scenes/s ({1e6 / best:.0f} us/scene), median {median:.0f} scenes/s")


if __name__ == "__main__":
    main()
