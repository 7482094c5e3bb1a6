"""Embedding throughput: the Ray Data pipeline against a plain single-process PyTorch loop.

Same model, same images, one run (timings on a shared machine are only comparable as ratios
taken together). Target: the Ray pipeline within 15% of the plain loop once started; its fixed
start-up cost (Ray, actor, model load, first batch) is reported separately.

    .venv/bin/python bench/embed_throughput.py                      # CPU, brain MRI, 1,000 images
    .venv/bin/python bench/embed_throughput.py --gpu --images 20000   # GPU: bf16, channels-last, pinned
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from medcurate.config import EmbedConfig, IngestConfig
from medcurate.embed import embed
from medcurate.ingest import ingest, read_manifest
from medcurate.ingest.decode import load_image
from medcurate.models import create_encoder, preprocess_batch
from medcurate.runtime import ensure_ray
from medcurate.workspace import Workspace

from _memory import PeakMemory  # noqa: E402  (bench/ sibling module)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def plain_loop(manifest, model: str, batch_size: int, gpu: bool) -> dict:
    """Decode, preprocess and embed in one process with every core (the baseline)."""
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if gpu else "cpu"
    start = time.monotonic()
    encoder = create_encoder(model).to(device)
    if gpu:
        encoder = encoder.to(memory_format=torch.channels_last)
    uris, members = manifest.column("uri").to_pylist(), manifest.column("member").to_pylist()
    loaded, first = time.monotonic(), None
    with torch.inference_mode():
        for i in range(0, len(uris), batch_size):
            images = [load_image(u, m) for u, m in zip(uris[i:i + batch_size],
                                                       members[i:i + batch_size])]
            pixels = torch.from_numpy(preprocess_batch(images, encoder.preprocessing))
            if gpu:
                pixels = pixels.pin_memory().to(device, non_blocking=True)
                pixels = pixels.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    encoder(pixels).float().cpu()
            else:
                encoder(pixels)
            if first is None:
                first, first_rows = time.monotonic(), len(images)
    end = time.monotonic()
    return {"total_s": round(end - start, 2), "startup_s": round(first - start, 2),
            "model_load_s": round(loaded - start, 2),
            "steady_images_per_s": round((len(uris) - first_rows) / (end - first), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2-imagenet")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gpu", action="store_true", help="GPU mode (needs CUDA)")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu asked for, but torch sees no CUDA device")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    files = sorted((args.data / "brain-tumor-mri" / "Training").glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"no brain-tumour MRI images under {args.data}")
    picked = files[:: max(1, len(files) // args.images)][: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "images.csv"
        with open(table, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            writer.writerows([str(f), f.parent.name] for f in picked)
        workspace = Workspace(str(Path(tmp) / "ws"))
        ray_start = time.monotonic()
        ensure_ray()
        ray_init_s = time.monotonic() - ray_start
        ingest(IngestConfig(source=str(table), name="bench"), workspace)
        manifest = read_manifest(workspace, "bench")
        with PeakMemory() as ray_memory:
            ray_result = embed(EmbedConfig(collection="bench", model=args.model,
                                           batch_size=args.batch_size), workspace)["timing"]
        import ray

        ray.shutdown()
        with PeakMemory() as plain_memory:
            plain = plain_loop(manifest, args.model, args.batch_size, args.gpu)
    ratio = ray_result["steady_images_per_s"] / plain["steady_images_per_s"]
    report = {
        "model": args.model, "images": len(picked), "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name() if args.gpu else f"cpu x{os.cpu_count()}",
        "ray_init_s": round(ray_init_s, 2),
        "ray_pipeline": {**ray_result, "peak_rss_gib": ray_memory.gib},
        "plain_loop": {**plain, "peak_rss_gib": plain_memory.gib},
        "steady_ratio_ray_over_plain": round(ratio, 3),
    }
    print(json.dumps(report, indent=2))
    print(f"\nRay pipeline {ray_result['steady_images_per_s']} img/s vs plain loop "
          f"{plain['steady_images_per_s']} img/s once started: ratio {ratio:.2f} "
          f"({'within' if ratio >= 0.85 else 'NOT within'} 15%); Ray fixed start-up "
          f"{ray_init_s:.1f} s init + {ray_result['startup_s']} s to first batch")


if __name__ == "__main__":
    main()
