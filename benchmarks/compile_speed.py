"""``--torch-compile``: images/s of a CNN's feature pass, eager against ``torch.compile``, on the same images.

Bulk ingestion spends its time in the CNN forward pass (a MedMNIST 3D 64³ dataset is about 100k slices per model).
This script embeds the same real MedMNIST images with one extractor built twice, eager and compiled
(:mod:`cbmir.ingest.extractors.compiled`), and prints::

    mode      images  seconds  images/s
    eager ...
    compiled ...
    speed-up, one-off compile seconds (the first compiled call, one pass over the images included),
    largest |compiled - eager| feature difference

    python -m cbmir.benchmarks.compile_speed                          # efficientnet_lite0 at 224 px, 256 images
    python -m cbmir.benchmarks.compile_speed --model efficientnet_lite2 --input-size 224 --threads 2

Measured on the project's 2-core AVX-512 CPU (fp32, 224 px, 2 threads): EfficientNet-Lite0 42 -> 60 images/s,
EfficientNet-Lite2 31 -> 47 (1.4-1.5x), largest feature difference 2e-6.
Weights are random (speed does not depend on their values). Data: ``--data-dir`` / ``CBMIR_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from cbmir.benchmarks.timing import best_of


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table and return the numbers (dict)."""
    p = argparse.ArgumentParser(prog="python -m cbmir.benchmarks.compile_speed", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_lite0", help="ImageNet CNN of the registry")
    p.add_argument("--dataset", default="breastmnist")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--images", type=int, default=256, help="train images to embed")
    p.add_argument("--input-size", default="224", help="native | N px")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per mode (best is kept)")
    p.add_argument("--data-dir", default=os.environ.get("CBMIR_DATA_DIR"), help="MedMNIST npz folder")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch

    from cbmir.ingest.extractors import create_extractor
    from cbmir.ingest.medmnist_data import open_medmnist

    if args.threads:
        torch.set_num_threads(args.threads)
    input_size = None if args.input_size == "native" else int(args.input_size)
    images = next(open_medmnist(args.dataset, args.size, args.data_dir).iter_batches("train", args.images)).images
    common = dict(random_init=True, device=args.device, batch_size=args.batch_size, input_size=input_size,
                  precision="fp32")
    eager = create_extractor(args.model, **common)
    compiled = create_extractor(args.model, torch_compile=True, **common)
    t0 = time.perf_counter()
    compiled.extract(images)  # the one-off compile, for every pass size the timed runs use (then a dynamic batch)
    compile_s = time.perf_counter() - t0
    a, eager_s = best_of(lambda: eager.extract(images), args.repeats)
    b, compiled_s = best_of(lambda: compiled.extract(images), args.repeats)
    n = len(images)
    out = {"images": n, "eager_s": eager_s, "compiled_s": compiled_s, "eager_images_per_s": n / eager_s,
           "compiled_images_per_s": n / compiled_s, "speedup": eager_s / compiled_s, "compile_s": compile_s,
           "max_abs_diff": float(np.abs(a - b).max()), "max_abs_feature": float(np.abs(a).max())}
    print(f"{args.model}, input {args.input_size}, fp32, {torch.get_num_threads()} threads, {args.device}")
    print(f"{'mode':<10}{'images':>8}{'seconds':>10}{'images/s':>10}")
    for mode in ("eager", "compiled"):
        print(f"{mode:<10}{n:>8}{out[mode + '_s']:>10.2f}{out[mode + '_images_per_s']:>10.1f}")
    print(f"speed-up {out['speedup']:.2f}x; one-off compile {compile_s:.1f} s; largest feature difference "
          f"{out['max_abs_diff']:.2e} (features up to {out['max_abs_feature']:.2f})")
    return out


if __name__ == "__main__":
    main()
