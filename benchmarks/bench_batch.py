"""Throughput of batched captioning, as ratios measured in one run.

For the bundled shapes model (``attnlab.load_model()``) and for CATR's
architecture with random weights (``attnlab.models.build_catr()``, its end token
suppressed so every caption is ``--catr-len`` tokens long), captions the same
images with :func:`attnlab.decode.decode_batch` (the engine of ``caption()`` and
of ``attnlab caption DIR``; the images are prepared beforehand, as the batch
runner's worker processes do) in batches of 1, 8 and 32, and prints images/s,
the ratio to batch 1 (one by one) and the peak resident memory each batch size
added. The configurations take turns within each round and the ratio is the
median over rounds of the per-round ratios (a shared, noisy machine: run it with
``nice -n -5`` and read the ratios, not the absolute numbers).

Targets on a CPU: shapes batched >= 3x one by one; CATR >= 1.4x.

Also: the shapes model end to end (``attnlab.batch.caption_folder``: PNG files,
worker processes, traces written) at batch 1, 8 and 32; a GPU section when CUDA
exists (the card is named); ``--flat N`` captions N shapes scenes end to end and
prints the process's memory as the run goes (it must stay flat: traces are
written as they finish, never held).

On a machine whose cores are all busy with other work, torch's default of one
thread per core makes every small operation wait for a busy core at each
parallel region (on the 2-core development machine ``normalize`` of one
128 x 128 image took 60 ms with 2 threads and 0.2 ms with 1): ``--threads 1``
measures the computation rather than that wait.

Usage: nice -n -5 python benchmarks/bench_batch.py [--images 64] [--catr-images 32] [--rounds 3]
       [--catr-len 12] [--end-to-end 128] [--threads 1] [--flat 10000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

import attnlab
from attnlab.decode import decode_batch
from attnlab.models import build_catr
from attnlab.preprocess import prepare_for

BATCHES = (1, 8, 32)


def rss_mb() -> float:
    """Resident memory of this process, MB (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms in a thread."""

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def added(self) -> float:
        return self.peak - self.base


def run_batches(model, pixels, shown, batch: int, max_len: int | None, device_sync=None) -> None:
    for i in range(0, len(pixels), batch):
        decode_batch(model, pixels[i : i + batch], shown[i : i + batch], max_len=max_len)
    if device_sync is not None:
        device_sync()


def measure(model, images, rounds: int, max_len: int | None, device_sync=None) -> dict[int, dict[str, float]]:
    """Per batch size: images/s (median), ratio to batch 1 (median of per-round ratios), peak MB added."""
    pixels, shown = prepare_for(images, model.spec)
    run_batches(model, pixels[:2], shown[:2], 2, max_len, device_sync)  # warm-up
    times: dict[int, list[float]] = {b: [] for b in BATCHES}
    peaks: dict[int, float] = {b: 0.0 for b in BATCHES}
    for _ in range(rounds):
        for b in BATCHES:
            if device_sync is not None:
                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as mem:
                start = time.perf_counter()
                run_batches(model, pixels, shown, b, max_len, device_sync)
                times[b].append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated() / 1e6 if device_sync is not None else mem.added
            peaks[b] = max(peaks[b], peak)
    n = len(images)
    return {
        b: {
            "rate": n / statistics.median(times[b]),
            "ratio": statistics.median(t1 / tb for t1, tb in zip(times[1], times[b])),
            "peak": peaks[b],
        }
        for b in BATCHES
    }


def report(title: str, result: dict[int, dict[str, float]], target: float | None, memory: str) -> None:
    print(title)
    for b, r in result.items():
        print(f"  batch {b:2d}: {r['rate']:7.2f} images/s   x{r['ratio']:5.2f} of one by one   {memory} {r['peak']:7.1f} MB")
    best = max(r["ratio"] for r in result.values())
    if target is not None:
        print(f"  best ratio x{best:.2f} (target >= {target}): {'met' if best >= target else 'NOT met'}")


def coco_like(n: int, seed: int = 0) -> list[np.ndarray]:
    """Photos of COCO's usual shapes: 640x480 landscape, every fourth 480x640 portrait, some 500x375."""
    rng = np.random.default_rng(seed)
    sizes = [(480, 640), (480, 640), (375, 500), (640, 480)]
    return [(rng.random((*sizes[i % 4], 3)) * 255).astype(np.uint8) for i in range(n)]


def end_to_end(model, n: int, rounds: int) -> dict[int, dict[str, float]]:
    """caption_folder over n scene PNGs (workers, traces written), per batch size."""
    from attnlab.batch import caption_folder
    from attnlab.shapes import save_scenes

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "scenes"
        save_scenes(folder, n, seed=1)
        caption_folder(model, folder, Path(tmp) / "warm-up", batch_size=8, progress=False)
        times: dict[int, list[float]] = {b: [] for b in BATCHES}
        peaks: dict[int, float] = {b: 0.0 for b in BATCHES}
        for r in range(rounds):
            for b in BATCHES:
                with PeakRSS() as mem:
                    rep = caption_folder(model, folder, Path(tmp) / f"out-{r}-{b}", batch_size=b, progress=False)
                times[b].append(rep.seconds)
                peaks[b] = max(peaks[b], mem.added)
    return {
        b: {"rate": n / statistics.median(times[b]), "ratio": statistics.median(t1 / tb for t1, tb in zip(times[1], times[b])), "peak": peaks[b]}
        for b in BATCHES
    }


def flat(n: int) -> None:
    """Caption n scenes end to end; print memory at every tenth of the run."""
    from attnlab.batch import caption_folder
    from attnlab.shapes import save_scenes

    model = attnlab.load_model()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "scenes"
        save_scenes(folder, n, seed=2)
        marks: list[tuple[int, float]] = []
        batch = 32

        def on_batch(k: int) -> None:
            done = k * batch
            if not marks or done >= marks[-1][0] + n // 10:
                marks.append((done, rss_mb()))

        start_rss = rss_mb()
        rep = caption_folder(model, folder, Path(tmp) / "out", batch_size=batch, on_batch=on_batch)
        print(f"--flat {n}: {rep.captioned} images in {rep.seconds:.0f} s ({rep.captioned / rep.seconds:.1f} images/s); "
              f"resident memory before the run {start_rss:.0f} MB")  # fmt: skip
        for done, mb in marks:
            print(f"  after {done:6d} images: {mb:7.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="shapes images per configuration")
    parser.add_argument("--catr-images", type=int, default=32, help="CATR images per configuration")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--catr-len", type=int, default=12, help="tokens per CATR caption")
    parser.add_argument("--end-to-end", type=int, default=128, help="scenes for the end-to-end section (0: skip)")
    parser.add_argument("--flat", type=int, default=0, metavar="N", help="only the memory-flatness run over N scenes")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flat:
        flat(args.flat)
        return

    from attnlab.shapes import make_scenes

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, niceness {os.nice(0)}")
    shapes = attnlab.load_model()
    scenes = [s.image for s in make_scenes(args.images, seed=0, split="eval")]
    report(f"shapes model, {args.images} scenes 128x128, decode_batch (cpu):", measure(shapes, scenes, args.rounds, None), 3.0, "peak RSS +")

    torch.manual_seed(0)
    catr = build_catr()
    with torch.no_grad():  # never emit the end token: every caption is --catr-len tokens
        catr.mlp.layers[-1].bias[catr.config.end_token_id] = -1e4
    photos = coco_like(args.catr_images)
    report(
        f"CATR architecture, random weights, {args.catr_images} photos 640x480/480x640/500x375 -> 299 long side, "
        f"{args.catr_len} tokens, decode_batch (cpu):",
        measure(catr, photos, args.rounds, args.catr_len), 1.4, "peak RSS +",
    )  # fmt: skip
    if args.end_to_end:
        report(
            f"shapes model end to end: caption_folder over {args.end_to_end} PNG scenes "
            f"({attnlab.batch.default_workers()} workers, traces written):",
            end_to_end(shapes, args.end_to_end, args.rounds), None, "peak RSS +",
        )  # fmt: skip

    if torch.cuda.is_available():
        sync = torch.cuda.synchronize
        print(f"GPU: {torch.cuda.get_device_name(0)}")
        shapes.to("cuda")
        report("shapes model on the GPU:", measure(shapes, scenes, args.rounds, None, sync), None, "peak CUDA")
        catr.to("cuda")
        report("CATR random weights on the GPU:", measure(catr, photos, args.rounds, args.catr_len, sync), None, "peak CUDA")
    else:
        print("GPU: none (torch.cuda.is_available() is False): no GPU section")


if __name__ == "__main__":
    main()
