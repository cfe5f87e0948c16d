# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""The command line both training scripts share, and the checks that need no model: flags, the output folder, the
base model's family (read from model_index.json before any weights load)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dopsd_metrics import DEFAULT_QUALITY_WARN_RATIO
from pipeline_dopsd import FAMILIES, Flux2KleinFamily, ModelFamily, family_class

# The reference recipe's buckets around 1 MP, as (height, width); --resolution rescales them to its pixel budget.
REFERENCE_BUCKETS = "1024,1024;896,1152;1152,896;864,1152;1152,864;832,1248;1248,832;720,1280;1280,720;576,1344;1344,576"


class UserError(Exception):
    """A problem with the user's input or an expected fault: the message names it and the fix. Scripts print it on one
    line and exit with `exit_code` (2; 130 for an interruption)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def run_main(main):
    """Run a script's main, turning a UserError (or Ctrl-C before training) into one line on stderr and its exit status."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted before training began; nothing to resume.", file=sys.stderr)
        sys.exit(130)


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
                       help="FLUX.2-klein only: text appended to the teacher's prompt (default: the reference scripts' "
                            f"'{Flux2KleinFamily.default_teacher_prompt_suffix}').")

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
    method.add_argument("--rollout_grid", choices=["inference", "reference"], default="inference",
                        help="inference: the rollout visits the deployment schedule's own states; reference: the grid "
                             "the reference implementation trained on (for FLUX.2-klein the scheduler's own "
                             "--rollout_steps grid, whose last state is sigma ~0.01 at 1024 px; for Z-Image-Turbo the "
                             "default's own 4 states).")
    method.add_argument("--loss_space", choices=["x0", "velocity"], default="x0",
                        help="Space of the MSE between student and teacher; x0 weighs each state by sigma^2.")
    method.add_argument("--ema_decay", type=float, default=0.9999,
                        help="teacher <- d * teacher + (1 - d) * student after every optimizer step; 1.0 freezes it.")

    train = p.add_argument_group("training")
    train.add_argument("--output_dir", default="dopsd-output",
                       help="Where the weights, checkpoints and logs go; one run per folder (a folder holding an earlier "
                            "run is refused unless resumed or --overwrite_output_dir), locked while the run lives.")
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="Start afresh in an --output_dir that holds an earlier run: its weights, checkpoints, logs and "
                            "samples are deleted first.")
    train.add_argument("--seed", type=int, default=0, help="Seed of data order, noise and initialisation.")
    train.add_argument("--train_batch_size", type=int, default=1, help="Batch size per device.")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Optimizer steps to train (default: the reference recipe's, 2000 Z-Image-Turbo, 3001 FLUX.2-klein).")
    train.add_argument("--gradient_accumulation_steps", type=int, default=None,
                       help="Batches per optimizer step (default: as many as give the reference recipe's 4 samples per "
                            "optimizer step with --train_batch_size on the launched processes).")
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
    if args.teacher_prompt_suffix is not None and family.default_teacher_prompt_suffix is None:
        raise UserError(f"--teacher_prompt_suffix is for FLUX.2-klein only: drop it for {family.display_name}.")
    if args.train_batch_size < 1 or (args.gradient_accumulation_steps is not None and args.gradient_accumulation_steps < 1):
        raise UserError("--train_batch_size and --gradient_accumulation_steps must be at least 1.")
    # accelerate launch starts the processes before this runs, and the launcher tells each how many there are.
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    defaults = {
        "num_inference_steps": family.native_steps,
        "rollout_steps": min(4, args.num_inference_steps or family.native_steps),
        "learning_rate": family.default_learning_rate,
        "max_train_steps": family.reference_train_steps,
        # The reference ran batch 1 on 4 GPUs; fewer samples per step make a noisier gradient at the same learning rate.
        "gradient_accumulation_steps": max(1, round(family.reference_batch_size / (args.train_batch_size * processes))),
        "teacher_prompt_suffix": family.default_teacher_prompt_suffix,
    }
    filled = {name: value for name, value in defaults.items() if getattr(args, name) is None and value is not None}
    for name, value in filled.items():
        setattr(args, name, value)
    if filled:
        print(f"{family.display_name} defaults: " + ", ".join(f"--{k} {v!r}" if isinstance(v, str) else f"--{k} {v}" for k, v in filled.items()))
    effective = args.train_batch_size * processes * args.gradient_accumulation_steps
    print(f"effective batch: {effective} samples per optimizer step ({args.train_batch_size} per process x {processes} "
          f"process{'es' if processes > 1 else ''} x {args.gradient_accumulation_steps} accumulated; the reference "
          f"recipe's is {family.reference_batch_size})")
    if not 1 <= args.rollout_steps <= args.num_inference_steps:
        raise UserError(f"--rollout_steps {args.rollout_steps} must be between 1 and --num_inference_steps {args.num_inference_steps}.")
    if args.rollout_grid == "reference" and (reason := family.check_reference_rollout(args.rollout_steps)):
        raise UserError(f"--rollout_grid reference: {reason}; use --rollout_grid inference.")
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
