"""What the tiny text-to-image fixtures and their evaluation share: class names, captions, data, image format.

Images: Fashion-MNIST zero-padded to 32×32 in [-1, 1] (the FD classifier's space), stored by the pipelines
as 3-channel RGB copies of the grey image, so every stock pipeline, image processor and PIL output works;
:func:`to_classifier_space` maps decoded pipeline images back to the classifier's (n, 1, 32, 32) in [-1, 1].
"""
from __future__ import annotations

import gzip
import os
from typing import List, Tuple

import numpy as np
import torch

# Fashion-MNIST label order (Xiao, Rasul & Vollgraf 2017)
CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = ["a photo of {a} {c}", "a picture of {a} {c}", "an image of {a} {c}", "a black and white photo of {a} {c}",
             "{a} {c}", "{c}"]
EVAL_TEMPLATE = TEMPLATES[0]
CAPTION_DROPOUT_TEXT = ""  # what the pipelines encode for classifier-free guidance without a negative prompt


def caption(class_index: int, template: str = EVAL_TEMPLATE) -> str:
    name = CLASS_NAMES[class_index]
    return template.format(a="an" if name[0] in "aeiou" else "a", c=name)


def caption_table() -> List[str]:
    """All training captions, class-major (`class * len(TEMPLATES) + template`), then the empty caption."""
    return [caption(c, t) for c in range(len(CLASS_NAMES)) for t in TEMPLATES] + [CAPTION_DROPOUT_TEXT]


def eval_prompts(n: int) -> Tuple[List[str], torch.Tensor]:
    """`n` prompts cycling over the 10 classes ("a photo of a sneaker", …) and their labels."""
    labels = torch.arange(n) % len(CLASS_NAMES)
    return [caption(int(c)) for c in labels], labels


def read_idx_labels(path: str) -> np.ndarray:
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        raw = f.read()
    if len(raw) < 8 or raw[2] != 8 or raw[3] != 1:
        raise ValueError(f"{path} is not an IDX label file (magic {raw[:4].hex()})")
    return np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)


def fmnist_labelled(folder: str, split: str = "train", limit: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images (n, 1, 32, 32) in [-1, 1] (padded with −1, as `diffusers_fewstep.evaluation.fmnist_images`)
    and labels (n,); `limit` > 0 keeps the first `limit`."""
    import torch.nn.functional as F
    from diffusers_fewstep.data import read_idx_images

    prefix = "t10k" if split == "test" else "train"
    path = os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; install dataset-fashion-mnist (Debian) or pass --data")
    raw = read_idx_images(path)
    labels = torch.from_numpy(read_idx_labels(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz")))
    if len(labels) != len(raw):
        raise ValueError(f"{folder}: {len(raw)} images but {len(labels)} labels")
    raw, labels = (raw[:limit], labels[:limit]) if limit > 0 else (raw, labels)
    images = torch.from_numpy(raw.copy()).float().div(127.5).sub(1.0).unsqueeze(1)
    return F.pad(images, (2, 2, 2, 2), value=-1.0), labels


def to_rgb(grey: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) → (n, 3, H, W): the pipelines' image format."""
    return grey.expand(-1, 3, -1, -1)


def to_classifier_space(images_01: torch.Tensor) -> torch.Tensor:
    """Pipeline output (`output_type="pt"`, (n, 3, H, W) in [0, 1]) → grey (n, 1, H, W) in [-1, 1]."""
    return images_01.float().mean(1, keepdim=True).mul(2).sub(1).clamp(-1, 1)


def pick_device(name: str = "") -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_pipeline(folder: str, device="cpu"):
    """The stock diffusers pipeline saved in `folder`, offline, in fp32 (components saved as None, as SD3's T5 may
    be, passed as None: :func:`diffusers_fewstep.hub.load_pipeline`)."""
    from diffusers_fewstep.hub import load_pipeline as load

    pipe = load(folder, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
