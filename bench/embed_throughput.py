"""Embedding throughput: the Ray Data pipeline against a plain single-process PyTorch loop.

Same model, same images, one run (timings on a shared machine are only comparable as ratios
taken together). Each side embeds n and then 2n images from scratch; the marginal rate
n / (T(2n) − T(n)) is its throughput once started, and T(n) − n / rate its fixed start-up cost
(Ray Data planning, actor start, model load, first batch), so neither hides in the other.
Target: the Ray pipeline within 15% of the plain loop once started.

    .venv/bin/python bench/embed_throughput.py                      # CPU, brain MRI, 300 + 600
    .venv/bin/python bench/embed_throughput.py --gpu --images 5000    # GPU: bf16, channels-last, pinned
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

from _memory import PeakMemory  # bench/ sibling module

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def plain_loop(manifest, model: str, batch_size: int, gpu: bool) -> None:
    """Decode, preprocess and embed in one process with every core (the baseline)."""
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if gpu else "cpu"
    encoder = create_encoder(model).to(device)
    if gpu:
        encoder = encoder.to(memory_format=torch.channels_last)
    uris, members = manifest.column("uri").to_pylist(), manifest.column("member").to_pylist()
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


def marginal(n: int, short_s: float, long_s: float) -> dict:
    rate = n / (long_s - short_s)
    return {"seconds_n": round(short_s, 2), "seconds_2n": round(long_s, 2),
            "images_per_s_once_started": round(rate, 2),
            "fixed_startup_s": round(short_s - n / rate, 2)}


def write_table(path: Path, files: list[Path]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([str(f), f.parent.name] for f in files)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2-imagenet")
    parser.add_argument("--images", type=int, default=300, help="n (the long run embeds 2n)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gpu", action="store_true", help="GPU mode (needs CUDA)")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu asked for, but torch sees no CUDA device")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    files = sorted((args.data / "brain-tumor-mri" / "Training").glob("*/*.jpg"))
    if len(files) < 2 * args.images:
        raise SystemExit(f"need {2 * args.images} brain-tumour MRI images under {args.data}")
    picked = files[:: len(files) // (2 * args.images)][: 2 * args.images]
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace(str(Path(tmp) / "ws"))
        ray_start = time.monotonic()
        ensure_ray()
        ray_init_s = time.monotonic() - ray_start
        for name, subset in (("short", picked[:n]), ("long", picked)):
            ingest(IngestConfig(source=str(write_table(Path(tmp) / f"{name}.csv", subset)),
                                name=name), workspace)
        seconds: dict[str, dict[str, float]] = {"ray": {}, "plain": {}}
        with PeakMemory() as ray_memory:
            for name in ("short", "long"):
                start = time.monotonic()
                embed(EmbedConfig(collection=name, model=args.model, batch_size=args.batch_size),
                      workspace)
                seconds["ray"][name] = time.monotonic() - start
        with PeakMemory() as plain_memory:
            for name in ("short", "long"):
                start = time.monotonic()
                plain_loop(read_manifest(workspace, name), args.model, args.batch_size, args.gpu)
                seconds["plain"][name] = time.monotonic() - start
    ray_side = marginal(n, seconds["ray"]["short"], seconds["ray"]["long"])
    plain_side = marginal(n, seconds["plain"]["short"], seconds["plain"]["long"])
    ratio = ray_side["images_per_s_once_started"] / plain_side["images_per_s_once_started"]
    report = {
        "model": args.model, "images": [n, 2 * n], "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name() if args.gpu else f"cpu x{os.cpu_count()}",
        "ray_init_s": round(ray_init_s, 2),
        "ray_pipeline": {**ray_side, "peak_rss_gib": ray_memory.gib},
        "plain_loop": {**plain_side, "peak_rss_gib": plain_memory.gib},
        "ratio_ray_over_plain_once_started": round(ratio, 3),
    }
    print(json.dumps(report, indent=2))
    print(f"\nonce started: Ray pipeline {ray_side['images_per_s_once_started']} img/s, plain "
          f"loop {plain_side['images_per_s_once_started']} img/s, ratio {ratio:.2f} "
          f"({'within' if ratio >= 0.85 else 'NOT within'} 15%); Ray fixed start-up "
          f"{ray_init_s:.1f} s init + {ray_side['fixed_startup_s']} s per run")


if __name__ == "__main__":
    main()
