"""`cfbd-fast embed --model hf-hub:ORG/NAME` offline: a tiny open_clip model written into a Hugging Face cache in
the test, loaded by the real hub code with HF_HUB_OFFLINE=1 (no network), embeds as open_clip itself does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfbd_fast.embed.models import TINY_MODEL, TINY_MODEL_CONFIG, register_tiny_model
from cfbd_fast.store import EmbeddingStore

ROOT = Path(__file__).resolve().parents[1]
REPO = "cfbd-test/tiny-clip-poisoned"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(home: Path, weights: bool = True):
    """HF_HOME/hub/models--ORG--NAME/{refs/main, snapshots/COMMIT/...}: the layout huggingface_hub reads offline."""
    import open_clip
    from safetensors.torch import save_file

    register_tiny_model()
    torch.manual_seed(77)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL)
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    config = {"model_cfg": TINY_MODEL_CONFIG,
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    if weights:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, snapshot / "open_clip_model.safetensors")
    return model.eval(), preprocess, open_clip.get_tokenizer(TINY_MODEL)


def _dataset(folder: Path, n: int = 6) -> tuple[list[Path], list[str]]:
    rng = np.random.default_rng(5)
    (folder / "images").mkdir(parents=True)
    paths, captions = [], []
    for i in range(n):
        path = folder / "images" / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
        captions.append(f"a photo of thing {i}")
    (folder / "data.csv").write_text("image,caption\n" + "".join(f"images/{i}.png,{c}\n" for i, c in enumerate(captions)))
    return paths, captions


def _embed(home: Path, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "cfbd_fast.cli.main", "embed", *map(str, args), "--workers", "0",
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_hf_hub_model_from_an_offline_cache_embeds_like_open_clip(tmp_path):
    model, preprocess, tokenizer = _hub_cache(tmp_path / "hf")
    paths, captions = _dataset(tmp_path / "data")
    done = _embed(tmp_path / "hf", tmp_path / "data" / "data.csv", "--model", f"hf-hub:{REPO}", "--out",
                  tmp_path / "s.cfbd", "--json")
    assert done.returncode == 0, done.stderr
    assert "random weights" not in done.stderr
    summary = json.loads(done.stdout)
    assert summary["rows_written"] == 6 and summary["model"] == f"hf-hub:{REPO}" and summary["dim"] == 32
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]), normalize=True)
        text = model.encode_text(tokenizer(captions), normalize=True)
    with EmbeddingStore.open(tmp_path / "s.cfbd") as store:
        np.testing.assert_allclose(store.image.astype(np.float32), image.numpy(), atol=2e-3, rtol=0)
        np.testing.assert_allclose(store.text.astype(np.float32), text.numpy(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("case", ["no weights", "not cached", "pretrained"])
def test_hf_hub_refusals_are_one_line(tmp_path, case):
    _hub_cache(tmp_path / "hf", weights=case != "no weights")
    _dataset(tmp_path / "data", n=2)
    name = f"hf-hub:{REPO}" if case != "not cached" else "hf-hub:cfbd-test/absent"
    extra = ["--pretrained", "openai"] if case == "pretrained" else []
    done = _embed(tmp_path / "hf", tmp_path / "data" / "data.csv", "--model", name, *extra, "--out", tmp_path / "s.cfbd")
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("Error: ") and name in error[0]
    assert ("--pretrained openai" if case == "pretrained" else "HF_HUB_OFFLINE") in error[0]
    assert not (tmp_path / "s.cfbd").exists()
