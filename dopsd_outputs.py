# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""What a run writes besides the weights: checkpoints (atomic, rotated, resumable), validation grids, the model card,
the Hub upload and args.json."""

from __future__ import annotations

import contextlib
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


SECRET_ARGS = ("hub_token",)
# What a run writes into --output_dir: a folder holding any of these holds a run.
RUN_OUTPUTS = ("args.json", "loss_log.jsonl", "validation_log.jsonl", "resumes.jsonl", "samples", "logs", "README.md",
               "transformer", "pytorch_lora_weights.safetensors")
LOCK_NAME = ".dopsd.lock"
# Flags a resume may change (recorded in resumes.jsonl): how long, where and how often to write, what to log, where
# things are. Every other flag defines the trained model, and a resume that changes it is refused.
RESUMABLE_CHANGES = {
    "resume_from_checkpoint", "output_dir", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit",
    "validation_prompt", "validation_steps", "num_validation_images", "skip_final_validation", "quality_warn_ratio",
    "report_to", "logging_dir", "push_to_hub", "hub_model_id", "hub_token", "cache_dir", "condition_cache_dir",
    "skip_bad_images", "allow_tf32", "gradient_checkpointing", "learning_rate", "max_grad_norm", "lora_format",
    "pretrained_model_name_or_path", "teacher_vlm_name_or_path", "instance_data_dir", "dataset_name",
    "overwrite_output_dir", "max_shard_size",
}
_held_lock = None


def public_args(args) -> dict:
    """The arguments as written to files and trackers: never a secret."""
    return {k: v for k, v in vars(args).items() if k not in SECRET_ARGS}


def checkpoint_dirs(output_dir) -> list[Path]:
    """Complete checkpoint-N folders, oldest first (a save in progress is never named checkpoint-N; a folder without
    its training_state.json, e.g. one copied in part, is passed over)."""
    dirs = [d for d in Path(output_dir).glob("checkpoint-*") if d.is_dir() and d.name.split("-")[-1].isdigit()]
    complete = [d for d in dirs if (d / "training_state.json").is_file()]
    for d in sorted(set(dirs) - set(complete)):
        logger.warning("%s has no training_state.json: not a complete checkpoint, passed over", d)
    return sorted(complete, key=lambda d: int(d.name.split("-")[-1]))


def earlier_run(out: Path) -> list[str]:
    """What of an earlier run --output_dir holds (empty for a new or empty folder)."""
    if not out.is_dir():
        return []
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    return found + sorted(p.name for p in out.glob("checkpoint-*")) + sorted(p.name for p in out.glob(".partial-*"))


def refuse_earlier_run(args) -> list[str]:
    """A folder holding an earlier run is refused unless the run resumes it or --overwrite_output_dir clears it.
    Writes nothing; returns what the folder holds."""
    out = Path(args.output_dir)
    found = earlier_run(out)
    # --preview_teacher_only writes only teacher_preview.png, typically into the folder the run will train in.
    if found and args.resume_from_checkpoint is None and not args.overwrite_output_dir and not args.preview_teacher_only:
        raise UserError(f"--output_dir {out} holds an earlier run ({', '.join(found[:4])}): resume it with "
                        "--resume_from_checkpoint latest, start afresh with --overwrite_output_dir (its outputs are "
                        "deleted), or choose another folder.")
    if args.resume_from_checkpoint == "latest" and found and not checkpoint_dirs(out) and not args.overwrite_output_dir:
        raise UserError(f"--resume_from_checkpoint latest: --output_dir {out} holds an earlier run ({', '.join(found[:4])}) "
                        "but no complete checkpoint: start afresh with --overwrite_output_dir, or choose another folder.")
    if args.resume_from_checkpoint is not None and args.overwrite_output_dir:
        raise UserError("--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint would resume: pass one of them.")
    return found


def claim_output_dir(args):
    """Make --output_dir this run's alone (called once the input is checked, before any model loads): a lock keeps a
    second run out while this one lives, and --overwrite_output_dir deletes the earlier run's outputs.

    Only the launch's first process takes the lock (the others are this run); the OS drops it when that process ends,
    however it ends."""
    import fcntl

    global _held_lock
    out = Path(args.output_dir)
    found = refuse_earlier_run(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"another run is writing into --output_dir {out} ({holder}): wait for it to end or choose another folder.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    _held_lock = handle
    if args.overwrite_output_dir and not args.preview_teacher_only:
        for name in found:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if found:
            logger.warning("--overwrite_output_dir: deleted the earlier run's %s", ", ".join(found))


def check_resume_matches(args, training_state: dict, processes: int):
    """A resumed run must train the model its checkpoint was trained as: the same recipe and the same number of
    processes (each rank resumes its own data position). Allowed changes are returned for the record."""
    if len(training_state["batches"]) != processes:
        raise UserError(f"the checkpoint was written by {len(training_state['batches'])} processes and this launch has "
                        f"{processes}: resume with the same number of processes.")
    saved = training_state.get("args")
    if saved is None:  # a checkpoint written before the recipe was recorded
        return {}
    now = public_args(args)
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
               if json.dumps(saved.get(k), default=str) != json.dumps(now.get(k), default=str)}
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE_CHANGES}
    if refused:
        flag, (before, after) = next(iter(refused.items()))
        more = f" (and {', '.join('--' + k for k in list(refused)[1:])})" if len(refused) > 1 else ""
        raise UserError(f"the checkpoint was trained with --{flag} {before} and this resume asks for {after}{more}: resume "
                        "with the checkpoint's settings (see its training_state.json), or start a new --output_dir.")
    return changed


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
    """Drop a JSON-lines log's rows past `step`: a resumed run writes them again. A torn row (a writer killed
    mid-line) is dropped too."""
    if not log.exists():
        return
    rows = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s: dropped a torn line (%r)", log, line[:80])
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows.append(line)
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
    with writing(partial, f"checkpoint-{step}", args.output_dir):
        accelerator.save_state(str(partial), **save_kwargs)
        accelerator.wait_for_everyone()  # every rank writes its RNG state (DeepSpeed: its optimizer partitions) into the folder: rename it only once all have
        if accelerator.is_main_process:
            (partial / "training_state.json").write_text(json.dumps(training_state))
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if args.checkpoints_total_limit is not None:
            for old in checkpoint_dirs(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def writing(partial: Path, what: str, output_dir):
    """A failed write (disk full, quota, a folder gone read-only) leaves no half-written folder behind and ends in one
    line saying what to do."""
    try:
        yield
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)  # also when interrupted
        if not isinstance(error, OSError):
            raise
        complete = checkpoint_dirs(output_dir)
        last = f"the last complete checkpoint is {complete[-1]}" if complete else "there is no complete checkpoint yet"
        raise UserError(f"could not write {what} ({error.strerror or error}): free space under {output_dir} and resume "
                        f"with --resume_from_checkpoint latest ({last}).") from None


def save_final_outputs(accelerator, adaptation, output_dir: Path):
    """The trained weights, written into a temporary folder by every rank (sharded engines gather collectively), then
    moved into place one entry at a time: a failed save leaves the outputs of before, never a torn file."""
    partial = output_dir / ".partial-final"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    with writing(partial, "the final weights", output_dir):
        if accelerator.is_main_process:
            partial.mkdir()
        adaptation.save_final(partial)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for entry in partial.iterdir():
                target = output_dir / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(entry, target)
            partial.rmdir()
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------------
# Validation grids and model card


def make_grid(rows: list[list[Image.Image]], labels: list[str] | None = None) -> Image.Image:
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(row) for row in rows), height * len(rows)), "white")  # edits: one source or more
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
                     triggers: list[str], kind: str, training_caption: str | None = None):
    """README.md in diffusers' model-card format: trigger words, step count, stock and custom-pipeline snippets,
    sample images as the widget, tags, the distilled base model and its licence. The snippets' prompt is the first
    sample's, else `training_caption` (one the model was trained on)."""
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    repo_id = args.hub_model_id or Path(args.output_dir).name
    base, steps, stock = args.pretrained_model_name_or_path, args.num_inference_steps, family.pipeline_class_name
    widget = []
    for i, (prompt, image) in enumerate(samples):
        image.save(output_dir / f"image_{i}.png")
        widget.append({"text": prompt, "output": {"url": f"image_{i}.png"}})
    example_prompt = samples[0][0] if samples else (training_caption or args.instance_prompt or "a photo")
    imports, inputs = family.usage(example_prompt)
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
{family.card_note}
Generate at the base model's deployment step count: **{steps} steps**{guidance.replace(", guidance_scale=", ", guidance ")}.

Training: {args.max_train_steps} steps at learning rate {args.learning_rate}; the rollout visits {args.rollout_steps} states of
the {steps}-step schedule; EMA teacher decay {args.ema_decay}; {args.loss_space}-space loss.

## Trigger words

{("Use " + ", ".join(f"`{t}`" for t in triggers) + " in the prompt.") if triggers else "Use prompts like the training captions."}

## Use with diffusers

```py
import torch
from diffusers import {stock}
{imports}
pipe = {stock}.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")
{load}
image = pipe({inputs}, num_inference_steps={steps}{guidance}).images[0]
```

The D-OPSD community pipeline gives the same images and adds a teacher preview (`reference_image=`):

```py
from diffusers import DiffusionPipeline
{imports}
pipe = DiffusionPipeline.from_pretrained("{base}", custom_pipeline="pipeline_dopsd.py", trust_remote_code=True)
{load}
image = pipe({inputs}).images[0]  # {steps} steps by default
```
"""
    license = family.license_for(base)
    # Built from diffusers' training template directly: never merged with a stale or remote card.
    data = ModelCardData(license=license, library_name="diffusers", base_model=base, instance_prompt=args.instance_prompt, widget=widget)
    card = ModelCard.from_template(card_data=data, template_path=MODEL_CARD_TEMPLATE_PATH, model_description=description)
    if license == "other":
        card.data.license_name = "flux-non-commercial-license"
        card.data.license_link = "https://huggingface.co/black-forest-labs/FLUX.2-klein-9B/blob/main/LICENSE.md"
    tags = [family.pipeline_tag, "diffusers-training", "diffusers", "dopsd", *family.tags]
    tags += ["lora", "template:sd-lora"] if kind == "lora" else []
    populate_model_card(card, tags=tags).save(str(output_dir / "README.md"))


def push_to_hub(args, output_dir: Path):
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token).repo_id
    upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="D-OPSD training result", token=args.hub_token,
                  ignore_patterns=["checkpoint-*", ".partial-*", "logs/*", "samples/*", ".dopsd.lock"])


def save_args(args, output_dir: Path, resumed_at: int | None = None, changed: dict | None = None):
    """args.json records how the run was started; each resume appends its step and changed flags to resumes.jsonl."""
    if resumed_at is None:
        (output_dir / "args.json").write_text(json.dumps(public_args(args), indent=2, default=str))
        return
    with open(output_dir / "resumes.jsonl", "a") as f:
        f.write(json.dumps({"step": resumed_at, "changed": {k: list(v) for k, v in (changed or {}).items() if k not in SECRET_ARGS}},
                           default=str) + "\n")
    if not (output_dir / "args.json").exists():  # resumed into a new folder
        (output_dir / "args.json").write_text(json.dumps(public_args(args), indent=2, default=str))
