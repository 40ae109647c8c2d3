"""Image decoding for `cfbd-fast embed`: PIL + open_clip's own preprocessing on CPU, or batched nvJPEG on CUDA.

Both raise or report `DecodeError(reason, detail)` for files that are not usable images, so the runner can
list them in the store's skip list instead of crashing.
"""
from __future__ import annotations

import io
import warnings
from typing import Callable

import numpy as np
import torch


class DecodeError(Exception):
    """An input that cannot be embedded; `reason` is a short category counted in the summary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def is_whole_jpeg(data: bytes) -> bool:
    """A JPEG that ends with its end-of-image marker: what goes to the GPU decoder. A truncated file (or one
    with trailing bytes) goes to PIL instead, which reports truncation rather than decoding a grey remainder."""
    return data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\0")[-2:] == b"\xff\xd9"


def read_image_file(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise DecodeError("missing file", path) from None
    except OSError as exc:
        raise DecodeError("unreadable file", f"{path}: {exc.strerror or exc}") from None


def decode_cpu(data: bytes, preprocess: Callable) -> torch.Tensor:
    """Decode fully with PIL (truncated files fail here) and apply `preprocess` to the image."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's palette/transparency and size warnings: not actionable here
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return preprocess(image)
        except UnidentifiedImageError:
            raise DecodeError("not an image", f"{len(data)} bytes that PIL cannot identify") from None
        except Image.DecompressionBombError as exc:
            raise DecodeError("too large", str(exc)) from None
        except Exception as exc:  # truncated or corrupt data surfaces as OSError, SyntaxError, ValueError, zlib.error...
            raise DecodeError("corrupt image", f"{type(exc).__name__}: {exc}") from None


class CpuPreprocess:
    """open_clip's inference transform in two steps: `__call__` (in loader workers) decodes and runs the PIL part
    (resize, crop, RGB) to a uint8 (H, W, 3) tensor; `finish` runs ToTensor + Normalize on a whole batch where
    the model is, with the same arithmetic, so the result is bit-identical to `preprocess(image)` while workers
    do less and pass a quarter of the bytes. A transform of another shape runs whole in `__call__`.
    """

    def __init__(self, preprocess: Callable):
        from torchvision.transforms import Compose, Normalize, ToTensor

        self.preprocess = preprocess
        self.pil_part, self.mean, self.std = None, None, None
        steps = getattr(preprocess, "transforms", None)
        if (isinstance(preprocess, Compose) and steps and len(steps) >= 2 and isinstance(steps[-1], Normalize)
                and (isinstance(steps[-2], ToTensor) or type(steps[-2]).__name__ == "MaybeToTensor")
                and not steps[-1].inplace):
            self.pil_part = Compose(steps[:-2])
            self.mean = torch.as_tensor(steps[-1].mean, dtype=torch.float32)
            self.std = torch.as_tensor(steps[-1].std, dtype=torch.float32)

    def __call__(self, data: bytes) -> torch.Tensor:
        if self.pil_part is None:
            return decode_cpu(data, self.preprocess)
        image = decode_cpu(data, self.pil_part)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (n, 3, H, W) float32, normalised; float batches pass through unchanged."""
        if batch.dtype != torch.uint8:
            return batch
        pixels = batch.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return pixels.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


class GpuPreprocess:
    """Batched JPEG decode (nvJPEG via torchvision), resize, center crop and normalise on a CUDA device.

    Mirrors open_clip's inference transform for its `shortest` (square) and `squash` resize modes; `supports`
    says whether a model's preprocessing can run here (otherwise every image is decoded on CPU). A JPEG the
    device decoder rejects (CMYK, arithmetic coding, damage) is retried with PIL and `preprocess` on CPU.
    """

    def __init__(self, preprocess_cfg: dict, device: str, preprocess: Callable):
        self.preprocess = preprocess
        size = preprocess_cfg.get("size", 224)
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        self.bilinear = preprocess_cfg.get("interpolation") == "bilinear"
        self.device = device
        self.mean = torch.tensor(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
                                 device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)),
                                device=device).view(1, 3, 1, 1)

    @staticmethod
    def supports(preprocess_cfg: dict) -> bool:
        size = preprocess_cfg.get("size", 224)
        square = not isinstance(size, (tuple, list)) or size[0] == size[1]
        mode = preprocess_cfg.get("resize_mode", "shortest")
        return torch.cuda.is_available() and (mode == "squash" or (mode == "shortest" and square))

    def __call__(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | DecodeError]:
        """Decode and preprocess a batch; each entry is a (3, H, W) float tensor on the device or a DecodeError."""
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 deprecates decode_jpeg in favour of torchcodec
            try:
                images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad file fails the batch: decode one at a time to find it
                images = []
                for data in encoded:
                    try:
                        images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        images.append(None)
        return [self._resize(image) if image is not None else self._on_cpu(data) for image, data in zip(images, encoded)]

    def _on_cpu(self, data: torch.Tensor) -> torch.Tensor | DecodeError:
        try:
            return decode_cpu(data.numpy().tobytes(), self.preprocess).to(self.device)
        except DecodeError as exc:
            return exc

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        mode = InterpolationMode.BILINEAR if self.bilinear else InterpolationMode.BICUBIC
        if self.resize_mode == "squash":
            image = F.resize(image, list(self.size), interpolation=mode, antialias=True)
        else:
            image = F.resize(image, [self.size[0]], interpolation=mode, antialias=True)
            image = F.center_crop(image, list(self.size))
        pixels = image.unsqueeze(0).float().div_(255)
        return ((pixels - self.mean) / self.std)[0]
