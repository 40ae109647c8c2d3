"""Mapping networks F: image embedding -> expected caption embedding (trained MLP, self-fit MLP, kNN over captions).

Every mapper has `map(image, rows) -> (n, dim) float32` (L2-normalized, on the image's device), a JSON-ready
`config` dict and `to(device)`. Cost on 3,000,000 rows x 512 dims, which decides the defaults:

* MLP 512-1024-512 (depth 2): about 2 MFLOP per row, 6 TFLOP per scan: a minute or so on a 2-core CPU,
  well under a second on a GPU. Training costs about 3x that per row and epoch, so `max_rows` caps it.
* Self-fit (`fit_self_mapper`): the same MLP trained `rounds` times on a sample of the scanned data
  (default 100,000 rows, 10 epochs: about 6 TFLOP per round), then applied like a trained one.
* kNN (`KnnMapper`): 2 * bank * dim FLOP per row; a 100,000-caption bank costs about 300 TFLOP at 3M rows
  (seconds on a GPU, hours on 2 CPU cores), so the bank defaults to 20,000 captions (about 60 TFLOP).

Mappers are saved as safetensors (weights, with the config in the header) plus a readable JSON copy of
the config beside them; loading never unpickles.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as torch_f
from torch import nn

from .errors import InputError, MapperMismatchError
from .progress import progress_bar

LOSSES = ("cosine", "infonce")
INFONCE_TEMPERATURE = 0.05
MAPPER_FORMAT = 1


class MLPMapper(nn.Module):
    """An MLP of `depth` linear layers (GELU between them, `hidden` wide); depth 1 is a linear map.

    Inputs are L2-normalized first, so raw or normalized embeddings give the same output.
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, hidden: int = 1024, **config):
        super().__init__()
        if depth < 1 or hidden < 1 or in_dim < 1 or out_dim < 1:
            raise InputError(f"mapper needs depth >= 1 and positive sizes, got depth={depth}, hidden={hidden}")
        widths = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            if index:
                layers.append(nn.GELU())
            layers.append(nn.Linear(width_in, width_out))
        self.layers = nn.Sequential(*layers)
        self.config = {"kind": "mlp", "format": MAPPER_FORMAT, "in_dim": in_dim, "out_dim": out_dim, "depth": depth,
                       "hidden": hidden, "model": None, "pretrained": None, "normalized": None, **config}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        weight = self.layers[0].weight
        # normalised in float32, then the matmuls in the weights' dtype (fp16/bf16 accumulate in float32 on CUDA)
        x = torch_f.normalize(image.to(weight.device, torch.float32), dim=-1).to(weight.dtype)
        return self.layers(x).float()

    def with_precision(self, dtype: torch.dtype) -> "MLPMapper":
        """This mapper with its weights in `dtype` (a copy when the dtype changes): half-precision matmuls."""
        if self.layers[0].weight.dtype == dtype:
            return self
        import copy

        return copy.deepcopy(self).to(dtype=dtype)

    @torch.inference_mode()
    def map(self, image: torch.Tensor, rows: np.ndarray | None = None) -> torch.Tensor:
        """Generated caption embeddings for `image` (n, in_dim); `rows` is unused (kNN needs it)."""
        return torch_f.normalize(self(image), dim=-1).to(image.device)


def _as_float_tensor(array, rows: np.ndarray) -> torch.Tensor:
    """Rows of a numpy array (a read-only fp16 memmap is fine) as a float32 tensor."""
    return torch.from_numpy(np.asarray(array[rows], dtype=np.float32))


def _loss(output: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    output = torch_f.normalize(output, dim=-1)
    target = torch_f.normalize(target, dim=-1)
    if loss == "cosine":
        return (1.0 - (output * target).sum(-1)).mean()
    logits = output @ target.T / INFONCE_TEMPERATURE
    labels = torch.arange(len(output), device=output.device)
    return 0.5 * (torch_f.cross_entropy(logits, labels) + torch_f.cross_entropy(logits.T, labels))


def _check_pairs(image, text) -> tuple[int, int, int]:
    if image.ndim != 2 or text.ndim != 2 or len(image) != len(text):
        raise InputError(f"image and text must be (n, dim) with the same n, got {image.shape} and {text.shape}")
    if len(image) < 2:
        raise InputError(f"a mapper needs at least 2 training pairs, got {len(image)}")
    return len(image), image.shape[1], text.shape[1]


def _evaluate(mapper: MLPMapper, image, text, rows: np.ndarray, loss: str, batch_size: int, device) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            output = mapper(_as_float_tensor(image, batch).to(device))
            total += float(_loss(output, _as_float_tensor(text, batch).to(device), loss)) * len(batch)
            count += len(batch)
    return total / max(count, 1)


def train_mapper(image, text, *, depth: int = 2, hidden: int = 1024, loss: str = "cosine", epochs: int = 30,
                 batch_size: int = 4096, lr: float = 1e-3, val_fraction: float = 0.05, patience: int = 3,
                 seed: int = 0, device: str | torch.device = "cpu", progress: bool = False, model: str | None = None,
                 pretrained: str | None = None, normalized: bool | None = None,
                 max_rows: int | None = None, rows: np.ndarray | None = None) -> MLPMapper:
    """Trains an MLP from image to caption embeddings on (n, dim) arrays, with early stopping on a validation split.

    Rows are read per batch, so read-only fp16 memmaps of any size work; `rows` restricts training to those row
    ids (the valid ones). The same seed gives the same mapper. Returns the weights of the best validation epoch
    (on CPU); raises InputError when no epoch improved on the untrained network.
    """
    n, in_dim, out_dim = _check_pairs(image, text)
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if epochs < 1 or batch_size < 2 or patience < 1:
        raise InputError(f"need epochs >= 1, batch_size >= 2, patience >= 1; got {epochs}, {batch_size}, {patience}")
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    rng = np.random.default_rng(seed)
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) < 2:
        raise InputError(f"a mapper needs at least 2 valid training pairs, got {len(rows)}")
    if max_rows is not None and max_rows < len(rows):
        if max_rows < 2:
            raise InputError(f"max_rows must be at least 2, got {max_rows}")
        rows = np.sort(rows[rng.choice(len(rows), size=max_rows, replace=False)])
    rows = rows[rng.permutation(len(rows))]
    val_count = min(max(1, int(round(len(rows) * val_fraction))), len(rows) - 1)
    val_rows, train_rows = np.sort(rows[:val_count]), rows[val_count:]

    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mapper = MLPMapper(in_dim, out_dim, depth, hidden, model=model, pretrained=pretrained,
                           normalized=normalized, loss=loss).to(device)
    optimizer = torch.optim.Adam(mapper.parameters(), lr=lr)
    best_loss = _evaluate(mapper, image, text, val_rows, loss, batch_size, device)
    initial_loss = best_loss
    best_state = {name: value.detach().clone() for name, value in mapper.state_dict().items()}
    best_epoch, stale, epochs_run = 0, 0, 0
    with progress_bar("train mapper", epochs, enabled=progress, unit="epochs") as bar:
        for epoch in range(1, epochs + 1):
            mapper.train()
            order = train_rows[rng.permutation(len(train_rows))]
            for start in range(0, len(order), batch_size):
                batch = np.sort(order[start:start + batch_size])
                if len(batch) < 2 and loss == "infonce":
                    continue
                output = mapper(_as_float_tensor(image, batch).to(device))
                batch_loss = _loss(output, _as_float_tensor(text, batch).to(device), loss)
                optimizer.zero_grad(set_to_none=True)
                batch_loss.backward()
                optimizer.step()
            mapper.eval()
            epochs_run = epoch
            val_loss = _evaluate(mapper, image, text, val_rows, loss, batch_size, device)
            bar.advance(1)
            if val_loss < best_loss - 1e-5:
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = {name: value.detach().clone() for name, value in mapper.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    break
    if best_epoch == 0:
        raise InputError(f"the mapper did not learn: validation loss {initial_loss:.4f} never improved in "
                         f"{epochs_run} epochs; check the embeddings (NaN rows, image and caption matrices "
                         f"swapped or unrelated) or lower the learning rate")
    mapper.load_state_dict(best_state)
    mapper.config.update(train_rows=int(len(train_rows)), val_rows=int(val_count), initial_val_loss=initial_loss,
                         val_loss=best_loss, best_epoch=best_epoch, epochs_run=epochs_run,
                         stopped_early=epochs_run < epochs, seed=seed, lr=lr, batch_size=batch_size)
    return mapper.cpu().eval()


def _per_row_cosine(mapper: MLPMapper, image, text, rows: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    out = np.empty(len(rows), np.float32)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        mapped = mapper.map(_as_float_tensor(image, batch))
        out[start:start + len(batch)] = (mapped * torch_f.normalize(_as_float_tensor(text, batch), dim=-1)).sum(-1)
    return out


def fit_self_mapper(image, text, *, sample: int = 100_000, trim: float = 0.05, rounds: int = 2, seed: int = 0,
                    device: str | torch.device = "cpu", progress: bool = False, epochs: int = 10,
                    patience: int = 2, **options) -> MLPMapper:
    """Fits the mapper on the scanned data itself, robust to a small poisoned fraction.

    Trains on a random sample of at most `sample` rows; each further round refits on the sample minus the
    `trim` fraction of rows the previous fit explains worst (lowest cosine between mapped image and caption).
    Other options go to `train_mapper`.
    """
    n, _, _ = _check_pairs(image, text)
    if not 0.0 <= trim < 1.0 or rounds < 1 or sample < 2:
        raise InputError(f"need 0 <= trim < 1, rounds >= 1, sample >= 2; got {trim}, {rounds}, {sample}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    kept = rows
    mapper = None
    for round_index in range(rounds):
        if mapper is not None:
            fit = _per_row_cosine(mapper, image, text, rows)
            drop = int(len(rows) * trim)
            kept = np.sort(rows[np.argsort(fit, kind="stable")[drop:]]) if drop else rows
        mapper = train_mapper(np.asarray(image[kept]), np.asarray(text[kept]),
                              seed=seed + round_index, device=device, progress=progress, epochs=epochs,
                              patience=patience, **options)
    mapper.config.update(fit="self", sample=int(len(rows)), trim=trim, rounds=rounds, fit_rows=int(len(kept)))
    return mapper


KNN_GATHER_BYTES = 2**28  # the gathered neighbours of one query block of KnnMapper.map


class KnnMapper:
    """F(I) = mean of the k captions in a bank nearest (by cosine) to I, leaving out the pair's own caption.

    `bank_rows` are the store row ids of the bank's captions (sorted); `map(image, rows)` skips the bank
    entry whose row id equals the query's row id, so a pair never predicts itself.
    """

    def __init__(self, bank_text, bank_rows, k: int = 10, *, model: str | None = None,
                 pretrained: str | None = None, normalized: bool | None = None, query_block: int = 2048):
        bank_text = torch.as_tensor(np.asarray(bank_text, dtype=np.float32))
        bank_rows = np.asarray(bank_rows, dtype=np.int64)
        if bank_text.ndim != 2 or len(bank_text) != len(bank_rows) or len(bank_rows) == 0:
            raise InputError(f"kNN bank needs (m, dim) captions and m row ids, got {tuple(bank_text.shape)} "
                             f"and {bank_rows.shape}")
        if np.any(np.diff(bank_rows) <= 0):
            raise InputError("kNN bank row ids must be strictly increasing")
        if not 1 <= k < len(bank_rows):
            raise InputError(f"k must be between 1 and the bank size - 1 ({len(bank_rows) - 1}), got {k}")
        self.bank = torch_f.normalize(bank_text, dim=-1)
        self.bank_rows = bank_rows
        self.k = k
        self.query_block = query_block
        self.config = {"kind": "knn", "format": MAPPER_FORMAT, "in_dim": bank_text.shape[1],
                       "out_dim": bank_text.shape[1], "k": k, "bank": len(bank_rows), "model": model,
                       "pretrained": pretrained, "normalized": normalized}

    def to(self, device) -> "KnnMapper":
        self.bank = self.bank.to(device)
        return self

    @torch.inference_mode()
    def map(self, image: torch.Tensor, rows: np.ndarray | None = None) -> torch.Tensor:
        """Mean of the k nearest bank captions per image, L2-normalized; `rows` are the images' store row ids."""
        device = self.bank.device
        out = torch.empty((len(image), self.bank.shape[1]), dtype=torch.float32, device=device)
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if len(rows) != len(image):
                raise InputError(f"rows has {len(rows)} entries for {len(image)} images")
        # a block's gathered neighbours (block x k x dim floats) stay within KNN_GATHER_BYTES
        block = max(1, min(self.query_block, KNN_GATHER_BYTES // (self.k * self.bank.shape[1] * 4)))
        for start in range(0, len(image), block):
            query = torch_f.normalize(image[start:start + block].to(device, torch.float32), dim=-1)
            similarity = query @ self.bank.T
            if rows is not None:
                block_rows = rows[start:start + len(query)]
                position = np.minimum(np.searchsorted(self.bank_rows, block_rows), len(self.bank_rows) - 1)
                own = np.flatnonzero(self.bank_rows[position] == block_rows)
                if len(own):
                    similarity[torch.from_numpy(own).to(device),
                               torch.from_numpy(position[own]).to(device)] = -float("inf")
            nearest = similarity.topk(self.k, dim=1).indices
            out[start:start + len(query)] = self.bank[nearest].mean(dim=1)
        return torch_f.normalize(out, dim=-1).to(image.device)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_mapper(mapper: MLPMapper, path: str | Path) -> Path:
    """Writes `path` (safetensors, config in its header) and `path` with suffix .json (the config); returns path."""
    from safetensors.torch import save_file

    path = Path(path)
    if not isinstance(mapper, MLPMapper):
        raise InputError(f"only trained MLP mappers can be saved, not {type(mapper).__name__}")
    if path.suffix == ".json":
        raise InputError(f"mapper path {path} must not end in .json (that name is taken by the config beside it)")
    config_text = json.dumps(mapper.config, sort_keys=True)
    state = {name: value.detach().cpu().contiguous() for name, value in mapper.state_dict().items()}
    for target, write in ((path, lambda tmp: save_file(state, str(tmp), metadata={"cfbd_fast_mapper": config_text})),
                          (_sidecar(path), lambda tmp: tmp.write_text(json.dumps(mapper.config, indent=2,
                                                                                 sort_keys=True) + "\n"))):
        tmp = target.with_name(target.name + ".tmp")
        write(tmp)
        os.replace(tmp, target)
    return path


def load_mapper(path: str | Path, *, expect_model: str | None = None, expect_dim: int | None = None,
                expect_pretrained: str | None = None) -> MLPMapper:
    """Loads a mapper written by `save_mapper` (no pickle).

    Raises MapperMismatchError when it was trained for another embedding model, pretrained tag or dim
    (a check is skipped when either side does not record it), InputError for a missing or corrupt file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"mapper file {path} not found: train one with `cfbd-fast train-mapper STORE --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        state = load_file(str(path))
        config = json.loads(header["cfbd_fast_mapper"]) if "cfbd_fast_mapper" in header else None
        if config is None:
            config = json.loads(_sidecar(path).read_text())
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise InputError(f"mapper file {path} is not a readable cfbd-fast mapper ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}): train it again") from exc
    if config.get("kind") != "mlp" or config.get("format", 0) > MAPPER_FORMAT:
        raise InputError(f"mapper file {path} holds kind {config.get('kind')!r}, format {config.get('format')}: "
                         f"this version reads MLP mappers of format {MAPPER_FORMAT}; upgrade cfbd-fast or retrain")
    for name, expected in (("model", expect_model), ("pretrained", expect_pretrained)):
        found = config.get(name)
        if expected is not None and found is not None and expected != found:
            raise MapperMismatchError(f"mapper {path} was trained on embeddings of {name} {found!r}, the store holds "
                                      f"{expected!r}: train a mapper on this store's model or use --mapper self")
    if expect_dim is not None and config.get("in_dim") != expect_dim:
        raise MapperMismatchError(f"mapper {path} takes {config.get('in_dim')}-dim embeddings, the store holds "
                                  f"{expect_dim}-dim: train a mapper on this store's model or use --mapper self")
    extra = {key: value for key, value in config.items() if key not in ("in_dim", "out_dim", "depth", "hidden")}
    try:
        mapper = MLPMapper(config["in_dim"], config["out_dim"], config["depth"], config["hidden"], **extra)
        mapper.load_state_dict(state, strict=True)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise InputError(f"mapper file {path} does not match its config ({type(exc).__name__}): train it again") from exc
    return mapper.eval()
