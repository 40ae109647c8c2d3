"""`cfbd-fast embed` benchmark: samples/s against a plain single-process loop, decode+resize separated from the model.

Writes N synthetic photo-like JPEGs and a CSV, then per model: the decode+preprocess stage alone (PIL + open_clip's
transform, one core), the model alone (encode_image + encode_text on preprocessed batches), the baseline a user
would write (one process: PIL open -> preprocess -> encode, batch by batch) and `embed` itself (DataLoader workers;
on CUDA also with nvJPEG decoding). Random weights (`pretrained` none): speed does not depend on the weights.
Usage: python benchmarks/bench_embed.py [--images 256] [--models cfbd-tiny ViT-B-32] [--batch-size 64]
       python benchmarks/bench_embed.py --device cuda --images 8192 --models ViT-B-32 --batch-size 256
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import append_results, machine, print_table


def write_dataset(folder: Path, n: int, size: tuple[int, int]) -> tuple[Path, list[Path], list[str]]:
    """N JPEGs (smooth gradients + noise, quality 90, like web photos) and folder/data.csv (image, caption)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    paths, captions = [], []
    for i in range(n):
        a, b, c = rng.uniform(-1, 1, (3, 3)).astype(np.float32)
        base = 128 + a * (x[..., None] - w / 2) * 0.5 + b * (y[..., None] - h / 2) * 0.5 + c * 40
        pixels = np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / "images" / f"{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
        captions.append(f"a photo of object number {i} on a table, seen from the side")
    lines = ["image,caption"] + [f"images/{p.name},{c}" for p, c in zip(paths, captions)]
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    return folder / "data.csv", paths, captions


def load(model_name: str, device: str):
    import open_clip
    import torch

    from cfbd_fast.embed import register_tiny_model

    register_tiny_model()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def decode_stage(paths: list[Path], preprocess) -> float:
    """Seconds per image of PIL decode + open_clip preprocessing, one core."""
    from PIL import Image

    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            preprocess(image)
    return (time.perf_counter() - started) / len(paths)


def model_stage(model, preprocess, tokenizer, paths, captions, batch: int, device: str) -> float:
    """Seconds per sample of encode_image + encode_text on already preprocessed batches."""
    import torch
    from PIL import Image

    pixels = torch.stack([preprocess(Image.open(p)) for p in paths[:batch]]).to(device)
    tokens = tokenizer(captions[:batch]).to(device)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    rounds = max(2, min(20, len(paths) // batch))
    with torch.inference_mode(), autocast:
        model.encode_image(pixels), model.encode_text(tokens)  # warm-up
        _sync(device)
        started = time.perf_counter()
        for _ in range(rounds):
            model.encode_image(pixels), model.encode_text(tokens)
        _sync(device)
    return (time.perf_counter() - started) / (rounds * batch)


def baseline(model, preprocess, tokenizer, paths, captions, batch: int, device: str) -> float:
    """The loop a user would write: one process, PIL open -> preprocess -> encode, batch by batch, fp16 output
    kept in memory (no store, no resume). Samples/s."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    autocast = torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    images, texts = [], []
    started = time.perf_counter()
    with torch.no_grad(), autocast:
        for start in range(0, len(paths), batch):
            pixels = torch.stack([preprocess(Image.open(p)) for p in paths[start:start + batch]]).to(device)
            tokens = tokenizer(captions[start:start + batch]).to(device)
            images.append(F.normalize(model.encode_image(pixels).float(), dim=-1).cpu().numpy().astype(np.float16))
            texts.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu().numpy().astype(np.float16))
    np.concatenate(images), np.concatenate(texts)
    return len(paths) / (time.perf_counter() - started)


def ours(csv: Path, out: Path, model_name: str, batch: int, device: str, workers: int | None,
         gpu_decode: bool | None) -> dict:
    from cfbd_fast.embed import embed

    shutil.rmtree(out, ignore_errors=True)
    summary = embed(csv, out, model_name, None, batch_size=batch, workers=workers, device=device,
                    gpu_decode=gpu_decode, commit_rows=4096)
    return summary.to_dict()


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", default="400x300", help="image width x height")
    ap.add_argument("--models", nargs="+", default=["cfbd-tiny", "ViT-B-32"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    import torch

    from cfbd_fast.embed import default_workers
    from cfbd_fast.threads import default_threads

    # The stages and the baseline get the thread count embed itself chooses for its model (cores minus load):
    # torch's default of one thread per core oversubscribes a busy machine and would slow the baseline unfairly.
    threads = default_threads()
    torch.set_num_threads(threads)
    size = tuple(int(v) for v in args.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        csv, paths, captions = write_dataset(Path(tmp) / "data", args.images, size)
        warm_csv = csv.with_name("warm-up.csv")  # the first 16 rows: one untimed embed call per model
        warm_csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:17]))
        for model_name in args.models:
            model, preprocess, tokenizer = load(model_name, args.device)
            decode_s = decode_stage(paths[:128], preprocess)
            model_s = model_stage(model, preprocess, tokenizer, paths, captions, args.batch_size, args.device)
            base = baseline(model, preprocess, tokenizer, paths, captions, args.batch_size, args.device)
            common = {"model": model_name, "device": args.device, "images": args.images, "batch": args.batch_size}
            rows.append({**common, "method": "stage: decode+preprocess (1 core)", "samples/s": 1 / decode_s,
                         "decode ms/img": decode_s * 1e3})
            rows.append({**common, "method": "stage: model only", "samples/s": 1 / model_s, "model ms/img": model_s * 1e3})
            rows.append({**common, "method": "baseline: PIL->preprocess->encode loop", "samples/s": base,
                         "vs baseline": 1.0})
            runs = [("embed, workers=0", 0, None), (f"embed, workers={default_workers()}", None, None)]
            if args.device == "cuda":
                runs = [(f"embed, cpu decode, workers={default_workers()}", None, False),
                        (f"embed, gpu decode, workers={default_workers()}", None, True)]
            del model
            ours(warm_csv, Path(tmp) / "out.cfbd", model_name, args.batch_size, args.device, 0, None)
            for label, workers, gpu_decode in runs:
                summary = ours(csv, Path(tmp) / "out.cfbd", model_name, args.batch_size, args.device, workers,
                               gpu_decode)
                timings = summary["timings"]
                rows.append({**common, "method": label, "samples/s": summary["samples_per_s"],
                             "vs baseline": summary["samples_per_s"] / base,
                             "decode ms/img": 1e3 * timings.get("decode_s", 0) / summary["inputs_read"],
                             "model ms/img": 1e3 * timings.get("model_s", 0) / summary["inputs_read"],
                             "wait ms/img": 1e3 * timings.get("wait_s", 0) / summary["inputs_read"]})
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(f"machine: {machine()}; baseline torch threads {threads}; {args.images} JPEGs {args.size}")
    print_table("embed throughput (samples/s; ms/img = seconds per sample in that stage)", rows,
                ["model", "method", "samples/s", "vs baseline", "decode ms/img", "model ms/img", "wait ms/img"])
    append_results("embed", rows)


if __name__ == "__main__":
    main()
