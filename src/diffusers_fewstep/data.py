"""Clean images for the bound objectives (Phase 1), the denoising loss (Phase 2) and FD reference sets."""
from __future__ import annotations

import glob
import gzip
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_idx_images(path: str) -> np.ndarray:
    """uint8 images `(n, rows, cols)` from an IDX file (`*-idx3-ubyte`, gzipped or not), e.g. Fashion-MNIST."""
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        raw = f.read()
    if len(raw) < 16 or raw[2] != 8 or raw[3] != 3:
        raise ValueError(f"{path} is not an IDX file of uint8 images (magic {raw[:4].hex()})")
    n, rows, cols = (int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(3))
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def fit_to_shape(x: torch.Tensor, sample_shape: Sequence[int]) -> torch.Tensor:
    """Match `(channels, height, width)`: average or repeat channels; pad smaller images with −1 (black,
    as the fixture pads Fashion-MNIST's 28×28 to 32×32), resize larger ones."""
    channels, height, width = sample_shape
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1) if channels != 1 else x.mean(1, keepdim=True)
    dh, dw = height - x.shape[2], width - x.shape[3]
    if dh >= 0 and dw >= 0:
        return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=-1.0).contiguous()
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True)


def load_images(path: str, sample_shape: Sequence[int], limit: Optional[int] = None) -> torch.Tensor:
    """Images in [-1, 1] shaped `(n, *sample_shape)` from:

    - an IDX file (`*-images-idx3-ubyte[.gz]`), or a folder holding Fashion-MNIST's IDX files
      (`train-…`, else `t10k-…`);
    - a `.pt` tensor already in [-1, 1];
    - a folder of images (searched recursively; each resized to the sample size).
    """
    if os.path.isdir(path):
        idx = [os.path.join(path, f"{split}-images-idx3-ubyte.gz") for split in ("train", "t10k")]
        idx = [p for p in idx if os.path.isfile(p)]
        if idx:
            path = idx[0]
        else:
            return _load_image_folder(path, sample_shape, limit)
    if path.endswith(".pt"):
        return torch.load(path).float()[:limit]
    x = torch.from_numpy(read_idx_images(path)[:limit].copy()).float().unsqueeze(1)
    return fit_to_shape(x / 127.5 - 1, sample_shape)


def _load_image_folder(path: str, sample_shape: Sequence[int], limit: Optional[int]) -> torch.Tensor:
    from PIL import Image

    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if f.lower().endswith(IMAGE_SUFFIXES))[:limit]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) or Fashion-MNIST IDX files in {path}")
    channels, height, width = sample_shape
    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(Image.open(f).convert(mode).resize((width, height), Image.BICUBIC)) for f in files]
    x = torch.from_numpy(np.stack(arrays)).float().reshape(len(files), height, width, -1).permute(0, 3, 1, 2)
    return fit_to_shape(x / 127.5 - 1, sample_shape)
