# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""What a run writes besides the weights: checkpoints (atomic, rotated, resumable), validation grids, the model card,
the Hub upload and args.json."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from PIL import Image

from dopsd_args import UserError
from dopsd_data import Example
from pipeline_dopsd import ModelFamily

logger = logging.getLogger("dopsd")


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


def save_checkpoint(accelerator, args, step: int, training_state: dict, **save_kwargs):
    """accelerator.save_state into a temporary folder, then an atomic rename to checkpoint-N, then rotation.

    Every rank writes into the temporary folder (its RNG state; DeepSpeed and FSDP their shards), so the main rank
    renames it only once all of them are done."""
    final = Path(args.output_dir) / f"checkpoint-{step}"
    partial = Path(args.output_dir) / f".partial-checkpoint-{step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), **save_kwargs)
    accelerator.wait_for_everyone()  # every rank writes its RNG state (DeepSpeed: its optimizer partitions) into the folder: rename it only once all have
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
# Validation grids and model card


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
        # The file holds alpha / rank folded into lora_B, so it loads at this strength in diffusers and ComfyUI alike.
        what = f"A LoRA (rank {args.rank}, alpha {args.lora_alpha}, folded into the weights: load it at strength 1)"
    else:
        load = f'pipe.transformer = type(pipe.transformer).from_pretrained("{repo_id}", subfolder="transformer", torch_dtype=torch.bfloat16).to("cuda")'
        what = "A full fine-tune of the transformer"
    method = ("D-OPSD, on-policy self-distillation (arXiv 2605.05204), which keeps the base model's few-step ability"
              if args.method == "dopsd" else "vanilla flow-matching SFT (the D-OPSD paper's baseline)")
    if getattr(args, "training_adapter", None):
        method += (f", with the training adapter `{args.training_adapter}` active during training only (it is not part "
                   "of this LoRA: do not load it for inference)")
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
