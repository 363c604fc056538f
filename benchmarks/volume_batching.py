"""Slice batching for 3D volumes: slices/s with batched extraction vs one slice per call.

The study ran its 2D extractor on one slice per call (3D database creation took 21-72 min per
model on a TITAN V GPU, DESIGN.md §3); cbmir sends the slices of several volumes to the
extractor in one call (:class:`cbmir.ingest.volumes.VolumeEmbedder`, ``slice_batch`` slices per call,
DESIGN.md §5). This script measures both on the same real volumes in the same run::

    python -m cbmir.benchmarks.volume_batching                     # resnet50, random init, 4 AdrenalMNIST3D 28³ volumes
    python -m cbmir.benchmarks.volume_batching --model densenet121 --volumes 8 --size 64

Weights are random (``--random-init``; no download): speed does not depend on the weight values.
Output: slices, seconds and slices/s per mode, the speed-up ratio, and the largest difference
between the two modes' vectors (same features up to float rounding of batched convolutions).
Data: ``--data-dir`` / ``CBMIR_DATA_DIR`` (official ``adrenalmnist3d[_64].npz``, no network needed).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from cbmir.benchmarks.timing import best_of


def measure(embedder, volumes: np.ndarray, repeats: int = 1) -> tuple[np.ndarray, float]:
    """Embed ``volumes`` ``repeats`` times; returns ``(vectors float32 (B, dim), best seconds)``."""
    return best_of(lambda: embedder.embed(volumes), repeats)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a small table and return the numbers (dict)."""
    p = argparse.ArgumentParser(prog="python -m cbmir.benchmarks.volume_batching", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50", help="2D extractor (random init), e.g. resnet50, densenet121")
    p.add_argument("--dataset", default="adrenalmnist3d")
    p.add_argument("--size", type=int, default=28, help="volume side: 28 or 64")
    p.add_argument("--volumes", type=int, default=4, help="volumes to embed (from the start of the train split)")
    p.add_argument("--data-dir", default=os.environ.get("CBMIR_DATA_DIR"), help="MedMNIST npz folder")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--batch-size", type=int, default=64,
                   help="extractor batch size (timm CNNs: images per pass at 128 px, more for small slices)")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per mode (best is kept)")
    args = p.parse_args(argv)

    from cbmir.ingest.extractors import create_extractor
    from cbmir.ingest.medmnist_data import open_medmnist
    from cbmir.ingest.volumes import VolumeEmbedder

    src = open_medmnist(args.dataset, args.size, args.data_dir)
    vols = next(src.iter_batches("train", args.volumes)).images
    extractor = create_extractor(args.model, random_init=True, device=args.device, batch_size=args.batch_size)
    batched = VolumeEmbedder(extractor, size=args.size)  # default: many slices per extract call
    single = VolumeEmbedder(extractor, size=args.size, slice_batch=1)  # the study: one slice per call
    n_slices = len(vols) * batched.slices
    batched.embed(vols[:1])  # warm-up (allocator, kernels) outside the timings
    v_b, t_b = measure(batched, vols, args.repeats)
    v_s, t_s = measure(single, vols, args.repeats)
    scale = np.abs(v_b).max()
    res = {
        "model": args.model, "device": str(getattr(extractor, "device", args.device)), "dataset": args.dataset,
        "size": args.size, "volumes": len(vols), "slices_per_volume": batched.slices, "slices": n_slices,
        "dim": batched.dim, "batched_s": t_b, "single_s": t_s,
        "batched_slices_per_s": n_slices / t_b, "single_slices_per_s": n_slices / t_s,
        "speedup": t_s / t_b, "max_rel_diff": float(np.abs(v_b - v_s).max() / scale) if scale > 0 else 0.0,
    }
    print(f"{args.model} (random init, {res['device']}) on {len(vols)} {args.dataset} {args.size}^3 volumes "
          f"-> {batched.slices} slices of {batched.slices}x{batched.slices} each, {n_slices} slices, dim {batched.dim}")
    print(f"  {'mode':<40} {'seconds':>9} {'slices/s':>10}")
    fb = getattr(extractor, "forward_batch", None)  # timm CNNs pack small slices into larger passes
    per_pass = min(batched.slice_batch, fb(batched.slices, batched.slices) if callable(fb) else args.batch_size)
    res["slices_per_pass"] = per_pass
    print(f"  {'batched (' + str(batched.slice_batch) + ' slices/call, ' + str(per_pass) + '/pass)':<40} "
          f"{t_b:9.2f} {res['batched_slices_per_s']:10.1f}")
    print(f"  {'one slice per call (the study)':<40} {t_s:9.2f} {res['single_slices_per_s']:10.1f}")
    print(f"  speed-up: {res['speedup']:.1f}x   (largest |difference| of the vectors / max |value|: "
          f"{res['max_rel_diff']:.1e})")
    return res


if __name__ == "__main__":
    main()
