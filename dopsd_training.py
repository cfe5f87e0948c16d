# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""What train_dopsd_lora.py and train_dopsd_full.py share: arguments, data, conditions, the D-OPSD and SFT steps,
the EMA teacher update, validation, checkpoints and the model card.

The method in one paragraph (arXiv 2605.05204): the same network is the student (text only, the inference path) and
the teacher (an EMA of the student that also sees the target image). The student rolls out its own few-step
trajectory from noise; at every state both predict, and the loss pulls the student's prediction onto the teacher's.
Model-family specifics (conditions, schedules, conventions) live in pipeline_dopsd.py; nothing here branches on them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from dopsd_metrics import DEFAULT_QUALITY_WARN_RATIO
from pipeline_dopsd import FAMILIES, ModelFamily, euler_step, family_class, rollout_sigmas, x0_from_velocity

logger = logging.getLogger("dopsd")

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# The reference recipe's buckets around 1 MP, as (height, width); --resolution rescales them to its pixel budget.
REFERENCE_BUCKETS = "1024,1024;896,1152;1152,896;864,1152;1152,864;832,1248;1248,832;720,1280;1280,720;576,1344;1344,576"


class UserError(Exception):
    """A problem with the user's input: the message names it and the fix. Scripts print it on one line and exit 2."""


def run_main(main):
    """Run a training script's main, turning a UserError into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------------
# Arguments


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one: None means "chosen at run time" and the help says how."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser(description: str) -> argparse.ArgumentParser:
    """The command line both training scripts share (diffusers example conventions; defaults follow the D-OPSD recipe)."""
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", "--pretrained_model", required=True,
                       help="Step-distilled base model: a Hub id or local folder with model_index.json "
                            f"(supported: {', '.join(FAMILIES)}).")
    model.add_argument("--revision", default=None, help="Revision of the base model on the Hub.")
    model.add_argument("--variant", default=None, help="Weight variant of the base model, e.g. fp16.")
    model.add_argument("--teacher_vlm_name_or_path", default="Qwen/Qwen3-VL-4B-Instruct",
                       help="Z-Image only: the Qwen3-VL whose language model receives Z-Image's text-encoder weights to "
                            "encode [target image, prompt] for the teacher.")
    model.add_argument("--teacher_min_pixels", type=int, default=512 * 512,
                       help="Z-Image only: smallest pixel budget of the teacher VLM's view of the target image.")
    model.add_argument("--teacher_max_pixels", type=int, default=768 * 768,
                       help="Z-Image only: largest pixel budget of the teacher VLM's view of the target image.")
    model.add_argument("--teacher_prompt_suffix", default=None,
                       help="FLUX.2-klein only: text appended to the teacher's prompt (default: an instruction to keep "
                            "subject, details, background and composition consistent with the reference image).")

    data = p.add_argument_group("data")
    data.add_argument("--instance_data_dir", default=None,
                      help="Folder of training images with same-stem .txt captions or a metadata.jsonl "
                           "(file_name + caption fields).")
    data.add_argument("--instance_prompt", default=None,
                      help="Caption for images that have none, e.g. 'a photo of [V] dog'.")
    data.add_argument("--dataset_name", default=None,
                      help="A Hub dataset or a local folder loaded with datasets (imagefolder).")
    data.add_argument("--dataset_config_name", default=None, help="Config of --dataset_name.")
    data.add_argument("--dataset_streaming", action="store_true",
                      help="Stream --dataset_name instead of downloading it whole; images are cropped to their bucket as "
                           "they arrive and dropped once their conditions are cached.")
    data.add_argument("--cache_dir", default=None, help="Cache folder for downloaded models and datasets.")
    data.add_argument("--image_column", default="image", help="Image column of --dataset_name.")
    data.add_argument("--caption_column", default=None,
                      help="Caption column(s); a comma-separated list samples one column per step "
                           "(the reference's multi-granularity captions). Default: 'text' or 'caption'.")
    data.add_argument("--resolution", type=int, default=1024,
                      help="Training resolution (a multiple of 16): square images train at resolution^2, other aspect "
                           "ratios in buckets of about the same area.")
    data.add_argument("--aspect_ratio_buckets", default=REFERENCE_BUCKETS,
                      help="Aspect-ratio buckets as 'h,w;h,w;...' for a 1024 resolution, scaled by --resolution / 1024; "
                           "each image goes to the nearest-aspect bucket, one bucket per batch.")
    data.add_argument("--condition_cache_dir", default=None,
                      help="Cache the computed conditions (and SFT latents) on disk here, reused across runs and "
                           "resumes and recomputed when the model, prompt or image changes; default: in memory.")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="Skip unreadable images with a warning instead of stopping.")

    method = p.add_argument_group("method")
    method.add_argument("--method", choices=["dopsd", "sft"], default="dopsd",
                        help="dopsd: on-policy self-distillation; sft: vanilla flow-matching fine-tuning on the images "
                             "(the paper's baseline).")
    method.add_argument("--num_inference_steps", type=int, default=None,
                        help="Deployment step count whose schedule the rollout follows "
                             "(default: the family's native count, Z-Image-Turbo 8, FLUX.2-klein 4).")
    method.add_argument("--rollout_steps", type=int, default=None,
                        help="States trained per rollout, spread over the deployment schedule and ending at sigma 0 "
                             "(default: 4 for Z-Image-Turbo, i.e. every other point; 4 for FLUX.2-klein, i.e. all).")
    method.add_argument("--loss_space", choices=["x0", "velocity"], default="x0",
                        help="Space of the MSE between student and teacher; x0 weighs each state by sigma^2.")
    method.add_argument("--ema_decay", type=float, default=0.9999,
                        help="teacher <- d * teacher + (1 - d) * student after every optimizer step; 1.0 freezes it.")

    train = p.add_argument_group("training")
    train.add_argument("--output_dir", default="dopsd-output", help="Where the weights, checkpoints and logs go.")
    train.add_argument("--seed", type=int, default=0, help="Seed of data order, noise and initialisation.")
    train.add_argument("--train_batch_size", type=int, default=1, help="Batch size per device.")
    train.add_argument("--max_train_steps", type=int, default=2000, help="Optimizer steps to train.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    train.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")
    train.add_argument("--learning_rate", type=float, default=None,
                       help="AdamW learning rate (default: the family's recipe, 1e-4 Z-Image-Turbo, 2e-5 FLUX.2-klein).")
    train.add_argument("--lr_scheduler", default="constant",
                       help="diffusers learning-rate schedule (constant, constant_with_warmup, cosine, linear, ...).")
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of --lr_scheduler.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    train.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (needs a CUDA GPU).")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="Mixed precision (default: accelerate's config). Frozen weights are stored in this dtype.")
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")

    ckpt = p.add_argument_group("checkpoints and validation")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint-N every N steps.")
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    ckpt.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint-N folder, or 'latest'.")
    ckpt.add_argument("--validation_prompt", action="append", default=None,
                      help="Prompt for the base | student | teacher grid (repeatable; default: the training prompts).")
    ckpt.add_argument("--validation_steps", type=int, default=100,
                      help="Validate every N steps and at the end; 0 validates only at the end.")
    ckpt.add_argument("--num_validation_images", type=int, default=2, help="Rows (seeds) per validation prompt.")
    ckpt.add_argument("--skip_final_validation", action="store_true", help="Do not validate at the end.")
    ckpt.add_argument("--quality_warn_ratio", type=float, default=DEFAULT_QUALITY_WARN_RATIO,
                      help="Warn when the student's few-step detail (high-frequency energy) falls below this fraction "
                           "of the base model's on the validation images (same noise): the turbo ability slipping.")
    ckpt.add_argument("--preview_teacher_only", action="store_true",
                      help="Write a student | teacher grid for the training images and exit without training.")
    ckpt.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none.")
    ckpt.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir.")

    hub = p.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the result and its model card.")
    hub.add_argument("--hub_model_id", default=None, help="Repository on the Hub (default: the output folder's name).")
    hub.add_argument("--hub_token", default=None, help="Hub token (prefer `hf auth login`).")
    return p


def finalize_args(args: argparse.Namespace) -> type[ModelFamily]:
    """Validate the arguments that need no model, detect the family, and fill family defaults (printed)."""
    if (args.instance_data_dir is None) == (args.dataset_name is None):
        raise UserError("pass exactly one of --instance_data_dir FOLDER and --dataset_name NAME.")
    if args.resolution % 16:
        raise UserError(f"--resolution {args.resolution} is not a multiple of 16: use e.g. {args.resolution // 16 * 16 or 16}.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise UserError("--report_to wandb with --hub_token would leak the token: log in with `hf auth login` instead.")
    if not 0.0 <= args.ema_decay <= 1.0:
        raise UserError(f"--ema_decay must be in [0, 1], got {args.ema_decay}.")
    if args.preview_teacher_only and args.method != "dopsd":
        raise UserError("--preview_teacher_only previews the D-OPSD teacher: drop --method sft.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UserError("--checkpoints_total_limit must be at least 1.")
    check_output_dir(Path(args.output_dir))

    config = load_model_index(args)
    try:
        family = family_class(config["_class_name"])
    except ValueError as error:
        raise UserError(str(error)) from None
    if config.get("is_distilled") is False and args.num_inference_steps is None:
        raise UserError(
            f"{args.pretrained_model_name_or_path} is not step-distilled (is_distilled=false): D-OPSD is for few-step "
            "models; use the distilled checkpoint or pass --num_inference_steps explicitly."
        )
    defaults = {
        "num_inference_steps": family.native_steps,
        "rollout_steps": min(4, args.num_inference_steps or family.native_steps),
        "learning_rate": family.default_learning_rate,
    }
    filled = {name: value for name, value in defaults.items() if getattr(args, name) is None}
    for name, value in filled.items():
        setattr(args, name, value)
    if filled:
        print(f"{family.display_name} defaults: " + ", ".join(f"--{k} {v}" for k, v in filled.items()))
    if args.teacher_prompt_suffix is not None and family.pipeline_class_name != "Flux2KleinPipeline":
        raise UserError(f"--teacher_prompt_suffix is for FLUX.2-klein only: drop it for {family.display_name}.")
    if not 1 <= args.rollout_steps <= args.num_inference_steps:
        raise UserError(f"--rollout_steps {args.rollout_steps} must be between 1 and --num_inference_steps {args.num_inference_steps}.")
    return family


def check_output_dir(out: Path):
    """The output folder must be a folder we can write, checked without creating anything."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file: choose a folder.")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to --output_dir {out} ({existing} is not writable): choose a writable folder.")


def load_model_index(args) -> dict:
    """model_index.json of the base model, read before any weights are loaded."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir)
    except Exception as error:  # noqa: BLE001 -- any failure to find the config is the same user problem
        raise UserError(
            f"cannot read model_index.json of {args.pretrained_model_name_or_path} ({type(error).__name__}): pass a "
            "diffusers model folder or Hub id."
        ) from None


# ----------------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Example:
    """One training image, already cropped to its bucket, with its candidate captions (one per caption column).

    `image` is dropped once its conditions are cached (thousands of images need not stay in memory); `size` and
    `digest` (a hash of the pixels, for the condition cache) remain.
    """

    name: str
    image: Image.Image | None
    captions: list[str]
    size: tuple[int, int] = (0, 0)
    digest: str = ""

    def __post_init__(self):
        if self.image is not None:
            import hashlib

            self.size = self.image.size
            self.digest = hashlib.sha256(self.image.tobytes()).hexdigest()


def open_image(path_or_image, name: str) -> Image.Image:
    """An RGB image with EXIF orientation applied; transparency is composited on white."""
    try:
        image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 -- PIL raises many types for broken files
        raise UserError(f"cannot read image {name} ({type(error).__name__}: {error}): replace it or pass --skip_bad_images.") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array / (65535.0 if array.max() > 255 else 255.0) * 255.0, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def _read_caption(path: Path) -> str:
    try:
        caption = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise UserError(f"caption {path} is not UTF-8 text: re-save it as UTF-8.") from None
    if not caption:
        raise UserError(f"caption file {path} is empty: write a caption or delete it to use --instance_prompt.")
    return caption


def _resolve_inside(root: Path, relative: str, where: str) -> Path:
    candidate = Path(relative)
    resolved = (root / candidate).resolve()
    if candidate.is_absolute() or not resolved.is_relative_to(root.resolve()):
        raise UserError(f"{where}: path {relative!r} points outside the dataset folder: use a path relative to {root}.")
    return resolved


def _caption_columns(args) -> list[str] | None:
    return [c.strip() for c in args.caption_column.split(",") if c.strip()] if args.caption_column else None


def collect_raw_examples(args):
    """(name, path or PIL image, captions) for every training image, checked before any model is loaded
    (a dataset's rows are checked as they are read, still before any model is loaded)."""
    columns = _caption_columns(args)
    if args.instance_data_dir is not None:
        return _folder_examples(Path(args.instance_data_dir), columns, args.instance_prompt)
    return _dataset_examples(args, columns)


def _folder_examples(root: Path, columns, instance_prompt):
    if not root.is_dir():
        raise UserError(f"--instance_data_dir {root} does not exist or is not a folder.")
    metadata = root / "metadata.jsonl"
    rows = []
    if metadata.exists():
        for line_number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{metadata}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{where} is not valid JSON: fix the line.") from None
            if "file_name" not in row:
                raise UserError(f"{where} has no 'file_name': add the image path relative to {root}.")
            path = _resolve_inside(root, row["file_name"], where)
            keys = columns or [k for k in ("text", "caption", "prompt") if k in row][:1]
            captions = [str(row[k]) for k in keys if row.get(k)]
            rows.append((str(path), path, captions or ([instance_prompt] if instance_prompt else [])))
    else:
        for path in sorted(root.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            caption_file = path.with_suffix(".txt")
            captions = [_read_caption(caption_file)] if caption_file.exists() else ([instance_prompt] if instance_prompt else [])
            rows.append((str(path), path, captions))
    if not rows:
        raise UserError(f"--instance_data_dir {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    for name, _, captions in rows:
        if not captions:
            raise UserError(f"{name} has no caption: add a same-stem .txt file, a metadata.jsonl entry or --instance_prompt.")
    return rows


def _dataset_examples(args, columns):
    import datasets

    try:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train",
                                        streaming=args.dataset_streaming)
        names = dataset.column_names or list(next(iter(dataset)).keys())
    except Exception as error:  # noqa: BLE001
        raise UserError(f"cannot load --dataset_name {args.dataset_name} ({type(error).__name__}: {error}).") from None
    if args.image_column not in names:
        raise UserError(f"--image_column {args.image_column} is not a column of {args.dataset_name} (columns: {', '.join(names)}).")
    columns = columns or [c for c in ("text", "caption", "prompt") if c in names][:1]
    missing = [c for c in columns if c not in names]
    if missing:
        raise UserError(f"--caption_column {','.join(missing)} not in {args.dataset_name} (columns: {', '.join(names)}).")
    return _dataset_rows(args, dataset, columns)


def _dataset_rows(args, dataset, columns):
    """Rows one at a time, so that a streamed dataset is never held whole in memory."""
    for i, row in enumerate(dataset):
        captions = [str(row[c]) for c in columns if row.get(c)] or ([args.instance_prompt] if args.instance_prompt else [])
        if not captions:
            raise UserError(f"row {i} of {args.dataset_name} has no caption: pass --caption_column or --instance_prompt.")
        yield f"{args.dataset_name}[{i}]", row[args.image_column], captions


def make_buckets(args) -> list[tuple[int, int]]:
    """The (height, width) buckets: --aspect_ratio_buckets (given for 1024) scaled by --resolution / 1024, to multiples of 16."""
    from diffusers.training_utils import parse_buckets_string

    try:
        base = parse_buckets_string(args.aspect_ratio_buckets)
    except ValueError as error:
        raise UserError(f"--aspect_ratio_buckets: {error}") from None
    scale = args.resolution / 1024
    return list(dict.fromkeys((max(16, round(h * scale / 16) * 16), max(16, round(w * scale / 16) * 16)) for h, w in base))


def crop_to_bucket(image: Image.Image, buckets) -> Image.Image:
    """Resize so the image covers the nearest-aspect bucket, then centre-crop to it."""
    from diffusers.training_utils import find_nearest_bucket

    height, width = buckets[find_nearest_bucket(image.height, image.width, buckets)]
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def load_examples(args, raw, family: type[ModelFamily]) -> list[Example]:
    """Open, check and bucket-crop every image (before heavy models are loaded, so a bad file fails fast)."""
    buckets = make_buckets(args)
    examples = []
    for name, source, captions in raw:
        try:
            image = open_image(source, name)
        except UserError:
            if not args.skip_bad_images:
                raise
            logger.warning("skipping unreadable image %s", name)
            continue
        if reason := family.check_reference_image(*image.size):
            raise UserError(f"{name}: {reason}; resize or remove it.")
        cropped = crop_to_bucket(image, buckets)
        if reason := family.check_reference_image(*cropped.size):
            raise UserError(f"{name} goes to a {cropped.size[0]}x{cropped.size[1]} bucket at --resolution {args.resolution}: {reason}; raise --resolution.")
        examples.append(Example(name, cropped, captions))
    if not examples:
        raise UserError("no readable training images: check the data source (or --skip_bad_images skipped them all).")
    return examples


class BucketBatches:
    """Batches of examples from one bucket, with one caption column per batch; reshuffled every epoch with the seed.

    The order depends only on (seed, epoch), so the position (epoch, index) is all a checkpoint needs to resume it.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.num_captions = max(len(e.captions) for e in examples)
        self.epoch, self.index = 0, 0
        self._batches = self._epoch_batches()

    def _epoch_batches(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, example in enumerate(self.examples):
            groups.setdefault(example.size, []).append(i)
        batches = []
        for indices in groups.values():
            rng.shuffle(indices)
            # Small sets fill a batch by repetition rather than dropping the bucket.
            while len(indices) % self.batch_size:
                indices.append(indices[rng.randrange(len(indices))])
            batches += [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        rng.shuffle(batches)
        while len(batches) % self.num_replicas:
            batches.append(batches[rng.randrange(len(batches))])
        return [(b, rng.randrange(self.num_captions)) for b in batches[self.rank :: self.num_replicas]]

    def __next__(self) -> tuple[list[int], int]:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._epoch_batches()
        batch = self._batches[self.index]
        self.index += 1
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]
        self._batches = self._epoch_batches()


def caption_of(example: Example, column: int) -> str:
    return example.captions[column % len(example.captions)]


def image_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return array[None]


# ----------------------------------------------------------------------------------------------------------------------
# Conditions, computed once per unique (prompt, image) and kept on the CPU


class ConditionCache:
    """Student and teacher conditions (and SFT target latents) for every (example, caption), computed once.

    With a folder, each entry is a safetensors file named by a hash of everything it depends on (model, teacher
    options, prompt, image pixels), loaded when a batch needs it: reused across runs and resumes, and recomputed when
    the model, the prompt or the image changes. Without one, entries stay in memory.
    """

    def __init__(self, directory: str | Path | None = None, fingerprint: str = ""):
        self.directory = Path(directory) if directory else None
        self.fingerprint = fingerprint
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.keys: dict[tuple, str] = {}
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _key(self, *parts) -> str:
        import hashlib

        digest = hashlib.sha256(self.fingerprint.encode())
        for part in parts:
            digest.update(part if isinstance(part, bytes) else str(part).encode())
            digest.update(b"\0")
        return digest.hexdigest()[:32]

    def _has(self, key: str) -> bool:
        return key in self.memory or bool(self.directory and (self.directory / f"{key}.safetensors").exists())

    def _put(self, key: str, tensors: dict[str, torch.Tensor]):
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if self.directory is None:
            self.memory[key] = tensors
            return
        from safetensors.torch import save_file

        partial = self.directory / f".{key}.{os.getpid()}.partial"
        save_file(tensors, str(partial))
        os.replace(partial, self.directory / f"{key}.safetensors")

    def _get(self, key: str) -> dict[str, torch.Tensor]:
        if key in self.memory:
            return self.memory[key]
        from safetensors.torch import load_file

        return load_file(str(self.directory / f"{key}.safetensors"))

    def student(self, prompt: str) -> dict[str, torch.Tensor]:
        return self._get(self.keys[("student", prompt)])

    def teacher(self, index: int, caption: str) -> dict[str, torch.Tensor]:
        return self._get(self.keys[("teacher", index, caption)])

    def latents(self, index: int) -> torch.Tensor:
        return self._get(self.keys[("latents", index)])["latents"]

    def teacher_row(self, prompt: str) -> dict[str, torch.Tensor]:
        return self._get(self.keys[("teacher-row", prompt)])

    @torch.no_grad()
    def fill(self, family: ModelFamily, examples: list[Example], method: str, rows: list[Example] = (), device="cpu",
             rank: int = 0, world_size: int = 1):
        """Compute what is missing, one kind at a time with only that kind's encoders on `device` (so a 4B text
        encoder and a 4B VLM never sit on the GPU together, and nothing moves when the disk cache is complete).
        Ranks split the work when the cache is on disk; call after every rank has indexed, then wait for all."""
        todo = self.index(examples, method, rows)
        for kind in ("student", "teacher", "latents"):
            missing = [(n, entry) for n, entry in enumerate(todo) if entry[0] == kind and not self._has(entry[1])]
            mine = [entry for n, entry in missing if self.directory is None or n % world_size == rank]
            if not mine:
                continue
            encoders = family.encoders_for(kind)
            for module in encoders:
                module.to(device)
            for _, key, prompt, example in mine:
                if kind == "student":
                    self._put(key, family.encode_student([prompt])[0])
                elif kind == "teacher":
                    self._put(key, family.encode_teacher([prompt], [example.image])[0])
                else:
                    self._put(key, {"latents": family.encode_images(image_tensor(example.image))[0]})
            for module in encoders:
                module.to("cpu")

    def index(self, examples, method, rows=()):
        """Name every entry this run needs; returns (kind, key, prompt, example) for each. `rows` are the validation
        (prompt, reference image) pairs, given as examples with one caption."""
        todo = []
        for prompt in sorted({c for e in [*examples, *rows] for c in e.captions}):
            key = self.keys[("student", prompt)] = self._key("student", prompt)
            todo.append(("student", key, prompt, None))
        for i, example in enumerate(examples):
            if method == "dopsd":
                for caption in example.captions:
                    key = self.keys[("teacher", i, caption)] = self._key("teacher", caption, example.digest)
                    todo.append(("teacher", key, caption, example))
            else:
                key = self.keys[("latents", i)] = self._key("latents", example.digest)
                todo.append(("latents", key, None, example))
        for row in rows if method == "dopsd" else ():
            key = self.keys[("teacher-row", row.captions[0])] = self._key("teacher", row.captions[0], row.digest)
            todo.append(("teacher", key, row.captions[0], row))
        return list({entry[1]: entry for entry in todo}.values())  # an entry shared by two uses is computed once


# ----------------------------------------------------------------------------------------------------------------------
# The method


def distillation_loss(x, sigma, v_student, v_teacher, loss_space: str) -> torch.Tensor:
    """MSE between the student's and the teacher's predictions at the same state (x0 space weighs it by sigma^2)."""
    if loss_space == "x0":
        return F.mse_loss(x0_from_velocity(x, sigma, v_student), x0_from_velocity(x, sigma, v_teacher))
    return F.mse_loss(v_student, v_teacher)


def dopsd_step(student, teacher, noise, sigmas, loss_space="x0", backward=None, rollout_context=contextlib.nullcontext):
    """One D-OPSD iteration on the student's own few-step rollout from `noise` along `sigmas`.

    `student(x, sigma)` and `teacher(x, sigma)` return velocities for a state. At every state: the teacher's prediction
    (no grad), the student's prediction, their loss, its backward (`backward(loss)`, which must scale by
    1 / rollout steps), and an Euler step with the student's velocity. The state is detached at every step, so one
    backward per state gives exactly the gradient of the averaged loss while memory stays flat in the number of steps.
    `rollout_context()` wraps each student forward+backward (e.g. `accelerator.accumulate`). Returns the per-state losses.
    """
    x, losses = noise, []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x.detach()
        with torch.no_grad():
            v_teacher = teacher(x, sigma)
        with rollout_context():
            v_student = student(x, sigma)
            loss = distillation_loss(x, sigma, v_student, v_teacher, loss_space)
            if backward is not None:
                backward(loss)
        losses.append(loss.detach().clone())  # mse_loss's scalar can view its elementwise buffer (it does on a CPU)
        x = euler_step(x, sigma, sigma_next, v_student.detach())
    return losses


def sft_step(student, x0, noise, sigma, backward=None):
    """Vanilla flow-matching SFT (the paper's baseline): regress the velocity noise - x0 at the noised ground truth."""
    sigma_b = sigma.view(-1, *([1] * (x0.dim() - 1)))
    x = (1 - sigma_b) * x0 + sigma_b * noise
    loss = F.mse_loss(student(x, sigma), noise - x0)
    if backward is not None:
        backward(loss)
    return loss.detach().clone()  # as in dopsd_step: not a view of the elementwise buffer


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], decay: float):
    """teacher <- decay * teacher + (1 - decay) * student, in the teacher's own (fp32) precision."""
    if decay >= 1.0 or not teacher_params:
        return
    student_params = [s.detach().to(t.dtype) for t, s in zip(teacher_params, student_params)]
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - decay)


def make_optimizer(args, params, engine_owns_step: bool = False):
    """AdamW over the trainable parameters (bitsandbytes' 8-bit AdamW with --use_8bit_adam).

    torch's fused AdamW updates every tensor in one kernel (a third of the foreach step's time on the tiny models),
    except where an engine re-partitions the parameters under the optimizer (`engine_owns_step`: DeepSpeed ZeRO)."""
    options = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                   eps=args.adam_epsilon)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes.") from None
        return bnb.optim.AdamW8bit(params, **options)
    return torch.optim.AdamW(params, fused=not engine_owns_step, **options)


def sample_sft_sigmas(family: ModelFamily, batch: int, height: int, width: int, generator, device) -> torch.Tensor:
    """Continuous noise levels for SFT, distributed like the family's inference schedule at this resolution."""
    grid = family.schedule(1000, height, width, device)[:-1]
    u = torch.rand(batch, generator=generator, device=generator.device).to(device)
    return grid[(u * (len(grid) - 1)).round().long()]


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dirs(output_dir) -> list[Path]:
    """Complete checkpoint-N folders, oldest first (a save in progress is never named checkpoint-N)."""
    dirs = [d for d in Path(output_dir).glob("checkpoint-*") if d.is_dir() and d.name.split("-")[-1].isdigit()]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[-1]))


def resolve_resume(args) -> Path | None:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        dirs = checkpoint_dirs(args.output_dir)
        if not dirs:
            logger.info("no checkpoint in %s; starting a new run", args.output_dir)
        return dirs[-1] if dirs else None
    path = Path(args.resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(args.output_dir) / path
    if not (path / "training_state.json").exists():
        raise UserError(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a complete checkpoint: pass a checkpoint-N folder or 'latest'.")
    return path


def forget_after(log: Path, step: int):
    """Drop a JSON-lines log's rows past `step`: a resumed run writes them again."""
    if log.exists():
        rows = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= step]
        log.write_text("".join(row + "\n" for row in rows))


def save_checkpoint(accelerator, args, step: int, training_state: dict):
    """accelerator.save_state into a temporary folder, then an atomic rename to checkpoint-N, then rotation."""
    final = Path(args.output_dir) / f"checkpoint-{step}"
    partial = Path(args.output_dir) / f".partial-checkpoint-{step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        (partial / "training_state.json").write_text(json.dumps(training_state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if args.checkpoints_total_limit is not None:
            for old in checkpoint_dirs(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------------
# Validation and model card


def make_grid(rows: list[list[Image.Image]], labels: list[str] | None = None) -> Image.Image:
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * len(rows[0]), height * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.resize((width, height)), (c * width, r * height))
    return grid


def validation_generator(prompt: str, row: int, seed: int) -> torch.Generator:
    """A fresh CPU generator per (prompt, row): every column of a row gets the same noise, and training RNG is untouched."""
    import hashlib

    digest = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
    return torch.Generator("cpu").manual_seed((seed * 7919 + digest + row) % 2**31)


def trigger_words(examples: list[Example], instance_prompt: str | None) -> list[str]:
    """Bracketed concept tokens such as [V] that appear in the training captions."""
    import re

    captions = [c for e in examples for c in e.captions] + ([instance_prompt] if instance_prompt else [])
    return sorted({token for caption in captions for token in re.findall(r"\[[^\]\s]{1,32}\]", caption)})


def write_model_card(args, family: type[ModelFamily], output_dir: Path, samples: list[tuple[str, Image.Image]],
                     triggers: list[str], kind: str):
    """README.md in diffusers' model-card format: trigger words, step count, stock and custom-pipeline snippets,
    sample images as the widget, tags, the distilled base model and its licence."""
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    repo_id = args.hub_model_id or Path(args.output_dir).name
    base, steps, stock = args.pretrained_model_name_or_path, args.num_inference_steps, family.pipeline_class_name
    widget = []
    for i, (prompt, image) in enumerate(samples):
        image.save(output_dir / f"image_{i}.png")
        widget.append({"text": prompt, "output": {"url": f"image_{i}.png"}})
    example_prompt = samples[0][0] if samples else (args.instance_prompt or "a photo")
    guidance = ", guidance_scale=0.0" if stock == "ZImagePipeline" else ""
    if kind == "lora":
        load = f'pipe.load_lora_weights("{repo_id}", weight_name="pytorch_lora_weights.safetensors")'
        what = f"A LoRA (rank {args.rank}, alpha {args.lora_alpha})"
    else:
        load = f'pipe.transformer = type(pipe.transformer).from_pretrained("{repo_id}", subfolder="transformer", torch_dtype=torch.bfloat16).to("cuda")'
        what = "A full fine-tune of the transformer"
    method = ("D-OPSD, on-policy self-distillation (arXiv 2605.05204), which keeps the base model's few-step ability"
              if args.method == "dopsd" else "vanilla flow-matching SFT (the D-OPSD paper's baseline)")
    description = f"""
# {family.display_name} {kind.upper() if kind == "lora" else "fine-tune"} trained with {"D-OPSD" if args.method == "dopsd" else "SFT"}: {repo_id}

<Gallery />

## Model description

{what} for [{base}](https://huggingface.co/{base}), trained with {method}.
Generate at the base model's deployment step count: **{steps} steps**{guidance.replace(", guidance_scale=", ", guidance ")}.

Training: {args.max_train_steps} steps at learning rate {args.learning_rate}; the rollout visits {args.rollout_steps} states of
the {steps}-step schedule; EMA teacher decay {args.ema_decay}; {args.loss_space}-space loss.

## Trigger words

{("Use " + ", ".join(f"`{t}`" for t in triggers) + " in the prompt.") if triggers else "Use prompts like the training captions."}

## Use with diffusers

```py
import torch
from diffusers import {stock}

pipe = {stock}.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")
{load}
image = pipe(prompt="{example_prompt}", num_inference_steps={steps}{guidance}).images[0]
```

The D-OPSD community pipeline gives the same images and adds a teacher preview (`reference_image=`):

```py
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}", custom_pipeline="pipeline_dopsd.py", trust_remote_code=True)
{load}
image = pipe(prompt="{example_prompt}").images[0]  # {steps} steps by default
```
"""
    license = family.license_for(base)
    # Built from diffusers' training template directly: never merged with a stale or remote card.
    data = ModelCardData(license=license, library_name="diffusers", base_model=base, instance_prompt=args.instance_prompt, widget=widget)
    card = ModelCard.from_template(card_data=data, template_path=MODEL_CARD_TEMPLATE_PATH, model_description=description)
    if license == "other":
        card.data.license_name = "flux-non-commercial-license"
        card.data.license_link = "https://huggingface.co/black-forest-labs/FLUX.2-klein-9B/blob/main/LICENSE.md"
    tags = ["text-to-image", "diffusers-training", "diffusers", "dopsd", *family.tags]
    tags += ["lora", "template:sd-lora"] if kind == "lora" else []
    populate_model_card(card, tags=tags).save(str(output_dir / "README.md"))


def push_to_hub(args, output_dir: Path):
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token).repo_id
    upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="D-OPSD training result", token=args.hub_token,
                  ignore_patterns=["checkpoint-*", ".partial-*", "logs/*", "samples/*"])


def save_args(args, output_dir: Path):
    public = {k: v for k, v in vars(args).items() if k != "hub_token"}
    (output_dir / "args.json").write_text(json.dumps(public, indent=2, default=str))



# ----------------------------------------------------------------------------------------------------------------------
# The training program both scripts run; `adaptation` is what differs (a LoRA teacher adapter, or an EMA weight copy).


def load_base_pipeline(args, weight_dtype, transformer_kwargs: dict):
    """The stock pipeline; `transformer_kwargs` (e.g. a quantization config) apply to its transformer only."""
    from diffusers import AutoModel, DiffusionPipeline

    common = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir, dtype=weight_dtype)
    components = {}
    if transformer_kwargs:
        components["transformer"] = AutoModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer", **common, **transformer_kwargs)
    return DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **common, **components)


def condition_fingerprint(args, dtype) -> str:
    """Everything a cached condition depends on besides its prompt and image."""
    return json.dumps({
        "model": str(args.pretrained_model_name_or_path), "revision": args.revision, "variant": args.variant, "dtype": str(dtype),
        "teacher_vlm": str(args.teacher_vlm_name_or_path), "teacher_pixels": [args.teacher_min_pixels, args.teacher_max_pixels],
        "teacher_prompt_suffix": args.teacher_prompt_suffix, "format": 1,
    }, sort_keys=True)


def validation_rows(args, examples):
    """(prompt, reference image) pairs for the grids: --validation_prompt with the first training image as the
    teacher's reference, or else the first caption of each training image (at most four)."""
    if args.validation_prompt:
        return [(p, examples[0].image) for p in args.validation_prompt]
    return [(e.captions[0], e.image) for e in examples[:4]]


class Run:
    """State of one training run, so the loop below reads top to bottom."""

    def __init__(self, args, family_cls, adaptation_cls):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.args = args
        raw = collect_raw_examples(args)
        self.examples = load_examples(args, raw, family_cls)
        # Every rollout state is one micro-batch of gradient accumulation: accelerate then scales each per-state loss
        # by 1 / (rollout_steps * accumulation), syncs gradients only after the last state, and steps the optimizer once.
        micro_steps = args.gradient_accumulation_steps * (args.rollout_steps if args.method == "dopsd" else 1)
        self.accelerator = Accelerator(
            # With no accelerator at all, `--multi_gpu` processes still form a (gloo) process group on the CPU.
            cpu=not torch.accelerator.is_available(),
            gradient_accumulation_steps=micro_steps, mixed_precision=args.mixed_precision,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / args.logging_dir)),
        )
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if self.accelerator.is_main_process else logging.WARNING)
        set_seed(args.seed)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.validates = bool(args.validation_steps or not args.skip_final_validation or args.preview_teacher_only)
        if self.sharded() and self.validates:
            raise UserError("validation samples from the whole model on one rank, which ZeRO-3 and FSDP shard: pass "
                            "--validation_steps 0 --skip_final_validation and evaluate the saved model with evaluate_dopsd.py.")
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)

        pipe = load_base_pipeline(args, self.weight_dtype, adaptation_cls.transformer_load_kwargs(args, self.weight_dtype))
        from pipeline_dopsd import family_for

        self.family = family_for(pipe)
        self.family.setup_teacher(
            vlm_name_or_path=args.teacher_vlm_name_or_path, min_pixels=args.teacher_min_pixels, max_pixels=args.teacher_max_pixels,
            prompt_suffix=args.teacher_prompt_suffix, needed=args.method == "dopsd",
            cache_dir=args.cache_dir,
        )
        self.rows = validation_rows(args, self.examples)
        self.conditions = ConditionCache(args.condition_cache_dir, condition_fingerprint(args, self.weight_dtype))
        rows = [Example("validation", image, [prompt]) for prompt, image in self.rows]
        self.conditions.fill(self.family, self.examples, args.method, rows, self.device,
                             self.accelerator.process_index, self.accelerator.num_processes)
        self.accelerator.wait_for_everyone()
        for example in self.examples:
            example.image = None  # conditions are cached; the validation rows keep their own references
        self.validation_teacher = {prompt: self.conditions.teacher_row(prompt) for prompt, _ in self.rows} if args.method == "dopsd" else {}
        self.family.drop_encoders(keep_vae=self.validates)
        from diffusers.training_utils import free_memory

        free_memory()

        # A quantized base is placed on its device when loaded and cannot be moved.
        self.transformer = pipe.transformer if getattr(pipe.transformer, "is_quantized", False) else pipe.transformer.to(self.device)
        self.transformer.requires_grad_(False)
        if args.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.adaptation = adaptation_cls(args, self.family, self.transformer, self.accelerator, self.weight_dtype)

    def sharded(self) -> bool:
        """Whether the engine shards the parameters themselves (ZeRO-3, FSDP)."""
        from accelerate.utils import DistributedType

        state = self.accelerator.state
        if state.distributed_type == DistributedType.DEEPSPEED:
            return state.deepspeed_plugin.zero_stage == 3
        return state.distributed_type == DistributedType.FSDP

    # -- forwards -------------------------------------------------------------------------------------------------------
    def student(self, model, condition):
        return lambda x, sigma: self.adaptation.student_velocity(model, x, sigma, condition)

    def teacher(self, condition):
        return lambda x, sigma: self.adaptation.teacher_velocity(x, sigma, condition)

    # -- validation -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self):
        """Rows of base | student | teacher with the same noise per row, at the deployment step count.

        The base column is generated once, before any training, and kept under samples/base/ so that it stays the
        untouched base model across validations and resumes (a fully fine-tuned run has no other copy of it).
        """
        args, family = self.args, self.family
        base_dir = Path(args.output_dir) / "samples" / "base"
        rows = []
        family.pipe.vae.to(self.device)
        for prompt, image in self.rows:
            width, height = image.size
            sigmas = family.sigmas(args.num_inference_steps, height, width, self.device)
            student_condition = family.collate([self.conditions.student(prompt)], self.device)
            for r in range(args.num_validation_images):
                generator = validation_generator(prompt, r, args.seed)
                base_file = base_dir / f"{generator.initial_seed()}-{width}x{height}.png"
                noise = family.initial_noise(1, height, width, generator).to(self.device)
                if base_file.exists():
                    base = Image.open(base_file).convert("RGB")
                else:
                    with self.adaptation.base():
                        base = family.decode(family.sample(self.transformer, student_condition, noise, sigmas))[0]
                    base_dir.mkdir(parents=True, exist_ok=True)
                    base.save(base_file)
                with self.adaptation.student():
                    student = family.decode(family.sample(self.transformer, student_condition, noise, sigmas))[0]
                row = [base, student]
                if prompt in self.validation_teacher:
                    teacher_condition = family.collate([self.validation_teacher[prompt]], self.device)
                    row.append(family.decode(self.adaptation.teacher_sample(teacher_condition, noise, sigmas))[0])
                rows.append(row)
        family.pipe.vae.to("cpu")
        return rows

    @torch.no_grad()
    def rollout_strip(self):
        """Decoded x0 predictions of the student (top) and the teacher (bottom) along one training rollout."""
        args, family = self.args, self.family
        if not self.validation_teacher:
            return None
        prompt, image = self.rows[0]
        width, height = image.size
        sigmas = rollout_sigmas(family.sigmas(args.num_inference_steps, height, width, self.device), args.rollout_steps)
        student_condition = family.collate([self.conditions.student(prompt)], self.device)
        teacher_condition = family.collate([self.validation_teacher[prompt]], self.device)
        x = family.initial_noise(1, height, width, validation_generator(prompt, 0, args.seed)).to(self.device)
        student_row, teacher_row = [], []
        family.pipe.vae.to(self.device)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            v_teacher = self.adaptation.teacher_velocity(x, sigma, teacher_condition)
            with self.adaptation.student():
                v_student = family.velocity(self.transformer, x, sigma, student_condition)
            student_row.append(family.decode(x0_from_velocity(x, sigma, v_student))[0])
            teacher_row.append(family.decode(x0_from_velocity(x, sigma, v_teacher))[0])
            x = euler_step(x, sigma, sigma_next, v_student)
        family.pipe.vae.to("cpu")
        return make_grid([student_row, teacher_row])

    def validate(self, step: int):
        """Grids under samples/ and to the trackers, and the student's sharpness relative to the base (same noise).
        Returns (prompt, student image) pairs for the model card."""
        from dopsd_metrics import few_step_quality_warning, sharpness_ratio

        rows = self.sample_grid()
        ratio = sharpness_ratio([row[1] for row in rows], [row[0] for row in rows])
        self.accelerator.log({"validation/sharpness_ratio": ratio}, step=step)
        with open(Path(self.args.output_dir) / "validation_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "sharpness_ratio": ratio}) + "\n")
        if warning := few_step_quality_warning(ratio, self.args.quality_warn_ratio):
            logger.warning("step %d: %s", step, warning)
        samples = Path(self.args.output_dir) / "samples"
        samples.mkdir(exist_ok=True)
        grid = make_grid(rows)
        grid.save(samples / f"step-{step:06d}.png")
        strip = self.rollout_strip()
        if strip is not None:
            strip.save(samples / f"rollout-step-{step:06d}.png")
        for tracker in self.accelerator.trackers:
            pictures = {"validation base|student|teacher": grid, **({"rollout x0 student/teacher": strip} if strip else {})}
            for name, picture in pictures.items():
                if tracker.name == "tensorboard":
                    tracker.writer.add_image(name, np.asarray(picture), step, dataformats="HWC")
                elif tracker.name == "wandb":
                    import wandb

                    tracker.log({name: wandb.Image(picture)}, step=step)
        samples = [(prompt, rows[i * self.args.num_validation_images][1]) for i, (prompt, _) in enumerate(self.rows)]
        return samples


def check_ranks_agree(accelerator, adaptation):
    """Every rank must end with the same student and teacher: compare one checksum of each across ranks."""
    if accelerator.num_processes == 1:
        return
    sums = torch.stack([adaptation.checksum("student"), adaptation.checksum("teacher")]).double().to(accelerator.device)
    gathered = accelerator.gather(sums[None]).view(accelerator.num_processes, 2)
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError(f"ranks disagree on the weights (checksums per rank {gathered.tolist()}): please report this.")
    logger.info("student and teacher identical on all %d ranks", accelerator.num_processes)


def preview_teacher(run: Run):
    """--preview_teacher_only: a student | teacher grid for the training images, before any training."""
    rows = run.sample_grid()
    path = Path(run.args.output_dir) / "teacher_preview.png"
    make_grid([row[1:] for row in rows]).save(path)
    logger.info("wrote %s (columns: student, teacher; rows: training prompts x seeds)", path)


def train(args, family_cls, adaptation_cls):
    """Load, cache conditions, then optimise: D-OPSD (or SFT) steps, EMA teacher, checkpoints, validation, save."""
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    run = Run(args, family_cls, adaptation_cls)
    accelerator, family, adaptation = run.accelerator, run.family, run.adaptation
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.preview_teacher_only:
        if accelerator.is_main_process:
            preview_teacher(run)
        return

    if accelerator.state.deepspeed_plugin is not None:
        # No dataloader goes through prepare(), so DeepSpeed is told the micro-batch size here.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    optimizer = make_optimizer(args, adaptation.trainable_parameters(), engine_owns_step=accelerator.state.deepspeed_plugin is not None)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(run.transformer, optimizer, lr_scheduler)
    adaptation.use_prepared(model)
    batches = BucketBatches(run.examples, args.train_batch_size, args.seed, accelerator.num_processes, accelerator.process_index)
    noise_generator = torch.Generator(run.device).manual_seed(args.seed * 1000 + accelerator.process_index)

    step = 0
    resume = resolve_resume(args)
    if resume is not None:
        accelerator.load_state(str(resume))
        state = json.loads((resume / "training_state.json").read_text())
        step = state["step"]
        batches.load_state_dict(state["batches"][accelerator.process_index])
        noise_generator.set_state(torch.tensor(state["noise_generator"][accelerator.process_index], dtype=torch.uint8))
        if accelerator.is_main_process:
            for log in ("loss_log.jsonl", "validation_log.jsonl"):
                forget_after(output_dir / log, step)
        logger.info("resumed from %s at step %d", resume, step)

    if accelerator.is_main_process:
        save_args(args, output_dir)
        accelerator.init_trackers("dopsd", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        if step == 0 and run.validates:
            run.validate(0)  # the untouched base column, and what the teacher draws before any training
    log_file = output_dir / "loss_log.jsonl"
    progress = tqdm(range(args.max_train_steps), initial=step, desc="steps", disable=not accelerator.is_local_main_process)
    while step < args.max_train_steps:
        losses = []
        for _ in range(args.gradient_accumulation_steps):
            indices, column = next(batches)
            examples = [run.examples[i] for i in indices]
            width, height = examples[0].size
            student_condition = family.collate([run.conditions.student(caption_of(e, column)) for e in examples], run.device)
            noise = family.initial_noise(len(indices), height, width, noise_generator, run.device)
            if args.method == "dopsd":
                teacher_condition = family.collate([run.conditions.teacher(i, caption_of(e, column)) for i, e in zip(indices, examples)], run.device)
                sigmas = rollout_sigmas(family.schedule(args.num_inference_steps, height, width, run.device), args.rollout_steps)
                with adaptation.student():
                    losses.append(dopsd_step(run.student(model, student_condition), run.teacher(teacher_condition), noise, sigmas,
                                             args.loss_space, accelerator.backward, lambda: accelerator.accumulate(model)))
            else:
                x0 = torch.stack([run.conditions.latents(i) for i in indices]).to(run.device)
                sigma = sample_sft_sigmas(family, len(indices), height, width, noise_generator, run.device)
                with adaptation.student(), accelerator.accumulate(model):
                    losses.append([sft_step(run.student(model, student_condition), x0, noise, sigma, accelerator.backward)])
        per_state = torch.stack([torch.stack(l) for l in losses]).mean(0)
        loss = accelerator.gather(per_state.mean()[None]).mean().item()
        if not math.isfinite(loss):
            progress.close()
            raise UserError(f"the loss is {loss} at step {step + 1}: training stopped, the last good checkpoint is kept; "
                            "lower --learning_rate (or --max_grad_norm) and resume.")
        grad_norm = accelerator.clip_grad_norm_(adaptation.trainable_parameters(), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        adaptation.update_teacher()
        step += 1

        logs = {"loss": loss, "lr": lr_scheduler.get_last_lr()[0]}
        if grad_norm is not None:  # DeepSpeed clips inside its engine
            logs["grad_norm"] = float(grad_norm)
        logs.update({f"loss_state_{k}": float(v) for k, v in enumerate(per_state)} if args.method == "dopsd" else {})
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4g}", **({"states": " ".join(f"{v:.2g}" for v in per_state.tolist())} if args.method == "dopsd" else {}),
                             lr=f"{logs['lr']:.2g}")
        accelerator.log(logs, step=step)
        if accelerator.is_main_process:
            with open(log_file, "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")

        if step % args.checkpointing_steps == 0:
            state = {
                "step": step,
                "batches": accelerator.gather_for_metrics([batches.state_dict()], use_gather_object=True),
                "noise_generator": accelerator.gather_for_metrics([noise_generator.get_state().tolist()], use_gather_object=True),
            }
            save_checkpoint(accelerator, args, step, state)
        if args.validation_steps and step % args.validation_steps == 0 and step < args.max_train_steps and accelerator.is_main_process:
            run.validate(step)

    accelerator.wait_for_everyone()
    check_ranks_agree(accelerator, adaptation)
    adaptation.save_final(output_dir)  # on every rank: sharded engines gather the weights collectively
    samples = []
    if accelerator.is_main_process:
        if not args.skip_final_validation:
            samples = run.validate(step)
        write_model_card(args, family_cls, output_dir, samples, trigger_words(run.examples, args.instance_prompt), adaptation.kind)
        if args.push_to_hub:
            push_to_hub(args, output_dir)
    accelerator.end_training()
