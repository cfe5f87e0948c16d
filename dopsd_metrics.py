# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""Metrics for a fine-tuned step-distilled model: was the concept learned, and was the few-step quality kept?

Two kinds live here:

* **Model-free** (numpy only; training validation imports them): ``high_frequency_energy`` of one image and
  ``sharpness_ratio`` of fine-tuned images against the base model's images for the same prompts and noise. Vanilla
  SFT on a step-distilled model blurs its few-step samples, and blur removes high-frequency energy, so a ratio well
  below 1 is the "my LoRA made everything soft" failure made into a number.
* **Model-based** (the paper's metrics, arXiv 2605.05204 section 4): DINO distance and CLIP-I to the reference image,
  CLIP-S to the prompt, LPIPS, and a Qwen3-VL judge. They take models that are already loaded, so callers choose the
  checkpoints (and tests can pass tiny random ones).

Images are PIL images, numpy arrays (H, W) or (H, W, C) in [0, 1] (float) or [0, 255] (uint8), or torch tensors
(C, H, W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Below this, the fine-tuned model keeps too little of the base model's detail to call its few-step quality intact.
# A heuristic, not a calibrated value: blur costs energy fast (a 0.5 px Gaussian blur keeps about a third of it on
# examples/tiny_concept), while a fine-tune that keeps the base's rendering stays near 1 even with new content.
DEFAULT_QUALITY_WARN_RATIO = 0.7

# Keeps the ratio finite for a flat base image; far below the energy of 8-bit quantisation noise (about 3e-5).
_ENERGY_FLOOR = 1e-8

# Rec. 601 luma, the weights of PIL's "L" mode.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


# ----------------------------------------------------------------------------------------------------------------------
# Model-free: few-step quality kept


def as_float_image(image) -> np.ndarray:
    """The image as a float64 array (H, W) or (H, W, C) with values in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    elif isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
        if image.ndim == 3:
            image = image.transpose(1, 2, 0)
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def luminance(image) -> np.ndarray:
    """Luma (H, W) in [0, 1]: detail lives in brightness, and one channel keeps the statistic colour-blind."""
    array = as_float_image(image)
    if array.ndim == 2:
        return array
    if array.shape[-1] == 1:
        return array[..., 0]
    return array[..., :3] @ _LUMA_WEIGHTS


def high_frequency_energy(image) -> float:
    """Mean squared Laplacian of the image's luminance: how much fine detail (edges, texture, grain) it has.

    0 is a flat image; a sharp photo at 1 MP is typically around 1e-3 to 1e-2. The value depends on content and
    resolution, so compare it only between images of the same prompt, noise and size (``sharpness_ratio``).
    """
    y = luminance(image)
    if min(y.shape) < 3:
        raise ValueError(f"high_frequency_energy needs an image of at least 3x3 pixels, got {y.shape[1]}x{y.shape[0]}.")
    laplacian = 4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]
    return float(np.mean(laplacian**2))


def sharpness_ratios(images: Sequence, base_images: Sequence) -> list[float]:
    """Per pair, ``high_frequency_energy(image) / high_frequency_energy(base_image)``; see ``sharpness_ratio``."""
    if len(images) != len(base_images):
        raise ValueError(f"sharpness needs paired images: got {len(images)} images and {len(base_images)} base images.")
    if not images:
        raise ValueError("sharpness needs at least one pair of images.")
    ratios = []
    for image, base in zip(images, base_images):
        image, base = as_float_image(image), as_float_image(base)
        if image.shape[:2] != base.shape[:2]:
            raise ValueError(f"paired images must have the same size, got {image.shape[:2]} and {base.shape[:2]}.")
        ratios.append((high_frequency_energy(image) + _ENERGY_FLOOR) / (high_frequency_energy(base) + _ENERGY_FLOOR))
    return ratios


def sharpness_ratio(images: Sequence, base_images: Sequence) -> float:
    """How much of the base model's fine detail a fine-tuned model keeps, from paired images.

    ``images[i]`` and ``base_images[i]`` must come from the same prompt and the same initial noise; the result is the
    mean over pairs of their ``high_frequency_energy`` ratio.

    * about 1: the fine-tune keeps the base model's few-step detail (new content moves it somewhat either way);
    * well below 1 (under ``DEFAULT_QUALITY_WARN_RATIO``): blur, the few-step ability is breaking, as vanilla SFT on a
      step-distilled model does;
    * well above 1: more high-frequency content than the base, which on a turbo model usually means grain or noise.
    """
    return float(np.mean(sharpness_ratios(images, base_images)))


def few_step_quality_warning(ratio: float, threshold: float = DEFAULT_QUALITY_WARN_RATIO) -> str | None:
    """A warning for users when a sharpness ratio falls below ``threshold``, else None."""
    if ratio >= threshold:
        return None
    return (
        f"few-step quality is slipping: the fine-tuned images keep {ratio:.0%} of the base model's fine detail "
        f"(warning below {threshold:.0%}). This is the blur that breaks a step-distilled model; compare the sample "
        "grids, and consider an earlier checkpoint or a lower learning rate."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Model-based: concept fidelity and prompt alignment


def _rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.round(as_float_image(image) * 255).astype(np.uint8)).convert("RGB")


def _resized_like(reference, image: Image.Image) -> Image.Image:
    # As the reference evaluation does: the reference is brought to the generated image's size, not the other way.
    return _rgb(reference).resize(image.size, Image.Resampling.BICUBIC)


def _pooled(features) -> torch.Tensor:
    # get_image_features / get_text_features return a tensor in older transformers, an output with pooler_output in 5.x.
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _cosine(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).tolist()


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def dino_embedding(model, processor, images: Sequence) -> torch.Tensor:
    """The L2-normalised mean of the DINO patch tokens (CLS and register tokens left out), one row per image.

    As the reference evaluation (run_score.py) computes it: the final layer's layer-normed patch tokens (transformers'
    `last_hidden_state`, DINO's `x_norm_patchtokens`) are averaged, then the average is normalised, so a token counts
    by its length. Images go in at full resolution (no resize or crop; the processor only rescales and normalises);
    all images of one call must have the same size.
    """
    inputs = processor(images=[_rgb(i) for i in images], return_tensors="pt", do_resize=False, do_center_crop=False)
    hidden = model(pixel_values=inputs["pixel_values"].to(model.device, model.dtype)).last_hidden_state
    patches = hidden[:, 1 + getattr(model.config, "num_register_tokens", 0) :]
    return F.normalize(patches.float().mean(dim=1), dim=-1)


def dino_distances(model, processor, images: Sequence, references: Sequence) -> list[float]:
    """Concept fidelity, lower is better: 1 - cosine of DINO features of each generated image and its reference.

    0 is the same image; unrelated images of the same kind are typically 0.3-0.6 for DINOv2.
    """
    distances = []
    for image, reference in zip(images, references, strict=True):
        image = _rgb(image)
        embeddings = dino_embedding(model, processor, [image, _resized_like(reference, image)])
        distances.append(1.0 - _cosine(embeddings[:1], embeddings[1:])[0])
    return distances


@torch.no_grad()
def clip_image_embedding(model, processor, images: Sequence, batch_size: int = 16) -> torch.Tensor:
    """CLIP image embeddings (the processor's resize and crop), one row per image."""
    rows = []
    for batch in _batches([_rgb(i) for i in images], batch_size):
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
        rows.append(_pooled(model.get_image_features(pixel_values=pixel_values)).float())
    return torch.cat(rows)


@torch.no_grad()
def clip_text_embedding(model, processor, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """CLIP text embeddings, truncated to the text model's context length, one row per text."""
    max_length = model.config.text_config.max_position_embeddings
    rows = []
    for batch in _batches(list(texts), batch_size):
        tokens = processor(text=batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        tokens = {k: v.to(model.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        rows.append(_pooled(model.get_text_features(**tokens)).float())
    return torch.cat(rows)


def clip_image_similarities(model, processor, images: Sequence, references: Sequence) -> list[float]:
    """Concept fidelity, higher is better (CLIP-I): cosine of CLIP image embeddings of each image and its reference."""
    return _cosine(clip_image_embedding(model, processor, images), clip_image_embedding(model, processor, references))


def clip_text_scores(model, processor, images: Sequence, texts: Sequence[str]) -> list[float]:
    """Prompt alignment, higher is better (CLIP-S): cosine of the CLIP image and text embeddings (not scaled by 100).

    Pass prompts with the concept token replaced by the class name: CLIP does not know the token.
    """
    if len(images) != len(texts):
        raise ValueError(f"CLIP-S needs one text per image, got {len(images)} images and {len(texts)} texts.")
    return _cosine(clip_image_embedding(model, processor, images), clip_text_embedding(model, processor, texts))


# ----------------------------------------------------------------------------------------------------------------------
# Optional: LPIPS (needs the lpips package) and a Qwen3-VL judge

LPIPS_MISSING_NOTE = "LPIPS skipped: the lpips package is not installed (pip install lpips)."


def load_lpips_model(device="cpu", net: str = "vgg"):
    """An LPIPS model (VGG, as the reference evaluation uses), or None when the lpips package is not installed.

    The lpips package fetches torchvision's pretrained backbone on first use, so the first call needs the network.
    """
    try:
        import lpips
    except ImportError:
        return None
    return lpips.LPIPS(net=net, verbose=False).to(device).eval()


def _minus_one_to_one(image: Image.Image, device) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device) * 2 - 1


@torch.no_grad()
def lpips_distances(lpips_model, images: Sequence, references: Sequence) -> list[float]:
    """Perceptual distance, lower is closer: LPIPS of each image to its reference (resized to the image's size)."""
    device = next(lpips_model.parameters()).device
    distances = []
    for image, reference in zip(images, references, strict=True):
        image = _rgb(image)
        a, b = _minus_one_to_one(image, device), _minus_one_to_one(_resized_like(reference, image), device)
        distances.append(float(lpips_model(a, b).reshape(-1)[0]))
    return distances


# The paper's VLM-J: a 4-level verdict per (reference, generated) pair, separately for subjects and styles.
JUDGE_LABELS = {
    "object": {"same instance": 4, "mostly same": 3, "partly similar": 2, "different instance": 1},
    "style": {"highly consistent": 4, "mostly consistent": 3, "slightly consistent": 2, "not consistent": 1},
}
JUDGE_QUESTIONS = {
    "object": (
        "The first image is a reference, the second a generated candidate. Is the main subject of the candidate the "
        "same specific instance as the reference (not merely the same kind of thing)? Answer with exactly one of: "
    ),
    "style": (
        "The first image is a reference style, the second a generated candidate whose subject and layout may differ. "
        "Judge only the visual style (palette, rendering, lighting, texture, strokes). Answer with exactly one of: "
    ),
}


def parse_judge_answer(answer: str, mode: str = "object") -> int | None:
    """The score (4 best, 1 worst) of the first label the answer names, or None when it names none."""
    text = answer.lower()
    found = [(text.find(label), score) for label, score in JUDGE_LABELS[mode].items() if label in text]
    return min(found)[1] if found else None


@torch.no_grad()
def judge_concept(model, processor, image, reference, mode: str = "object", max_new_tokens: int = 32) -> tuple[int | None, str]:
    """Ask a Qwen3-VL judge whether ``image`` shows the reference's concept: (score 1-4 or None if unparsed, answer)."""
    labels = ", ".join(JUDGE_LABELS[mode])
    messages = [{"role": "user", "content": [
        {"type": "image", "image": _rgb(reference)},
        {"type": "image", "image": _rgb(image)},
        {"type": "text", "text": JUDGE_QUESTIONS[mode] + labels + "."},
    ]}]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    return parse_judge_answer(answer, mode), answer
