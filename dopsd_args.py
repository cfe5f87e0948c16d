# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""The command line both training scripts share, and the checks that need no model: flags, the output folder, the
base model's family (read from model_index.json before any weights load)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import dopsd_flags as flags
from dopsd_metrics import DEFAULT_QUALITY_WARN_RATIO
from pipeline_dopsd import FAMILIES, TASKS, Flux2KleinEditFamily, Flux2KleinFamily, ModelFamily, family_class

# The reference recipe's buckets around 1 MP, as (height, width); --resolution rescales them to its pixel budget.
REFERENCE_BUCKETS = "1024,1024;896,1152;1152,896;864,1152;1152,864;832,1248;1248,832;720,1280;1280,720;576,1344;1344,576"


def _lr_schedules() -> list[str]:
    from diffusers.optimization import SchedulerType

    # piecewise_constant needs step rules, which the training loop does not pass: offered, it could only crash.
    return [s.value for s in SchedulerType if s is not SchedulerType.PIECEWISE_CONSTANT]


REPORT_TO = ["tensorboard", "wandb", "all", "none"]


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
    p = flags.Parser(description=description, formatter_class=_HelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", "--pretrained_model", required=True, type=flags.text,
                       help="Step-distilled base model: a Hub id or local folder with model_index.json "
                            f"(supported: {', '.join(FAMILIES)}).")
    model.add_argument("--revision", default=None, type=flags.text, help="Revision of the base model on the Hub.")
    model.add_argument("--variant", default=None, type=flags.text, help="Weight variant of the base model, e.g. fp16.")
    model.add_argument("--teacher_vlm_name_or_path", default="Qwen/Qwen3-VL-4B-Instruct", type=flags.text,
                       help="Z-Image only: the Qwen3-VL whose language model receives Z-Image's text-encoder weights to "
                            "encode [target image, prompt] for the teacher.")
    model.add_argument("--teacher_min_pixels", type=flags.positive_int, default=512 * 512,
                       help="Z-Image only: smallest pixel budget of the teacher VLM's view of the target image.")
    model.add_argument("--teacher_max_pixels", type=flags.positive_int, default=768 * 768,
                       help="Z-Image only: largest pixel budget of the teacher VLM's view of the target image.")
    model.add_argument("--teacher_prompt_suffix", default=None,
                       help="FLUX.2-klein only: text appended to the teacher's prompt (default: the reference scripts' "
                            f"'{Flux2KleinFamily.default_teacher_prompt_suffix}'; for --task edit, their gt-ref edit "
                            f"suffix '{Flux2KleinEditFamily.default_teacher_prompt_suffix}').")

    data = p.add_argument_group("data")
    data.add_argument("--task", choices=TASKS, default="text-to-image",
                      help="What the model learns: 'text-to-image', or 'edit' (FLUX.2-klein): an editing LoRA from "
                           "(source image(s), instruction, edited target) rows; the student is klein's editing path, the "
                           "teacher also sees the target as its last reference image.")
    data.add_argument("--instance_data_dir", default=None, type=flags.text,
                      help="Folder of training images with same-stem .txt captions or a metadata.jsonl "
                           "(file_name + caption fields; for --task edit also source_image, a path or a list of paths, "
                           "or the reference's local_path_list of sources then target).")
    data.add_argument("--instance_prompt", default=None, type=flags.text,
                      help="Caption for images that have none, e.g. 'a photo of [V] dog'.")
    data.add_argument("--dataset_name", default=None, type=flags.text,
                      help="A Hub dataset or a local folder loaded with datasets (imagefolder).")
    data.add_argument("--dataset_config_name", default=None, type=flags.text, help="Config of --dataset_name.")
    data.add_argument("--dataset_streaming", action="store_true",
                      help="Stream --dataset_name instead of downloading it whole; images are cropped to their bucket as "
                           "they arrive and dropped once their conditions are cached.")
    data.add_argument("--cache_dir", default=None, type=flags.text, help="Cache folder for downloaded models and datasets.")
    data.add_argument("--image_column", default="image", type=flags.text,
                      help="Image column of --dataset_name (for --task edit: the edited target).")
    data.add_argument("--source_image_column", default="source_image", type=flags.name_list,
                      help="--task edit with --dataset_name: the column(s) holding the image(s) to edit, in order "
                           "(comma-separated; a column may hold a list of images).")
    data.add_argument("--caption_column", default=None, type=flags.name_list,
                      help="Caption column(s); a comma-separated list samples one column per step "
                           "(the reference's multi-granularity captions). Default: 'text', 'caption', 'prompt' or "
                           "'instruction', the "
                           "first a row has. Every listed column must exist in the data; a row that lacks some of them "
                           "uses its other listed captions, and a row with none of them --instance_prompt.")
    data.add_argument("--resolution", type=flags.integer(16, multiple_of=16), default=1024,
                      help="Training resolution (a multiple of 16): square images train at resolution^2, other aspect "
                           "ratios in buckets of about the same area.")
    data.add_argument("--aspect_ratio_buckets", default=REFERENCE_BUCKETS, type=flags.buckets,
                      help="Aspect-ratio buckets as 'h,w;h,w;...' for a 1024 resolution, scaled by --resolution / 1024; "
                           "each image goes to the nearest-aspect bucket, one bucket per batch.")
    data.add_argument("--condition_cache_dir", default=None, type=flags.text,
                      help="Cache the computed conditions (and SFT latents) on disk here, reused across runs and "
                           "resumes and recomputed when the model, prompt or image changes; default: in memory.")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="Skip unreadable images with a warning instead of stopping.")

    method = p.add_argument_group("method")
    method.add_argument("--method", choices=["dopsd", "sft"], default="dopsd",
                        help="dopsd: on-policy self-distillation; sft: vanilla flow-matching fine-tuning on the images "
                             "(the paper's baseline).")
    method.add_argument("--num_inference_steps", type=flags.positive_int, default=None,
                        help="Deployment step count whose schedule the rollout follows "
                             "(default: the family's native count, Z-Image-Turbo 8, FLUX.2-klein 4).")
    method.add_argument("--rollout_steps", type=flags.positive_int, default=None,
                        help="States trained per rollout, spread over the deployment schedule and ending at sigma 0 "
                             "(default: 4 for Z-Image-Turbo, i.e. every other point; 4 for FLUX.2-klein, i.e. all).")
    method.add_argument("--rollout_grid", choices=["inference", "reference"], default="inference",
                        help="inference: the rollout visits the deployment schedule's own states; reference: the grid "
                             "the reference implementation trained on (for FLUX.2-klein the scheduler's own "
                             "--rollout_steps grid, whose last state is sigma ~0.01 at 1024 px; for Z-Image-Turbo the "
                             "default's own 4 states).")
    method.add_argument("--loss_space", choices=["x0", "velocity"], default="x0",
                        help="Space of the MSE between student and teacher; x0 weighs each state by sigma^2.")
    method.add_argument("--ema_decay", type=flags.fraction, default=0.9999,
                        help="teacher <- d * teacher + (1 - d) * student after every optimizer step; 1.0 freezes it.")

    train = p.add_argument_group("training")
    train.add_argument("--output_dir", default="dopsd-output", type=flags.text,
                       help="Where the weights, checkpoints and logs go; one run per folder (a folder holding an earlier "
                            "run is refused unless resumed or --overwrite_output_dir), locked while the run lives.")
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="Start afresh in an --output_dir that holds an earlier run: its weights, checkpoints, logs and "
                            "samples are deleted first.")
    train.add_argument("--seed", type=flags.seed, default=0, help="Seed of data order, noise and initialisation.")
    train.add_argument("--train_batch_size", type=flags.positive_int, default=1, help="Batch size per device.")
    train.add_argument("--max_train_steps", type=flags.positive_int, default=None,
                       help="Optimizer steps to train (default: the reference recipe's, 2000 Z-Image-Turbo, 3001 FLUX.2-klein).")
    train.add_argument("--gradient_accumulation_steps", type=flags.positive_int, default=None,
                       help="Batches per optimizer step (default: as many as give the reference recipe's 4 samples per "
                            "optimizer step with --train_batch_size on the launched processes).")
    train.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")
    train.add_argument("--learning_rate", type=flags.positive_number, default=None,
                       help="AdamW learning rate (default: the family's recipe, 1e-4 Z-Image-Turbo, 2e-5 FLUX.2-klein).")
    train.add_argument("--lr_scheduler", default="constant", choices=_lr_schedules(), help="diffusers learning-rate schedule.")
    train.add_argument("--lr_warmup_steps", type=flags.non_negative_int, default=0, help="Warm-up steps of --lr_scheduler.")
    train.add_argument("--adam_beta1", type=flags.open_fraction, default=0.9, help="AdamW beta1.")
    train.add_argument("--adam_beta2", type=flags.open_fraction, default=0.999, help="AdamW beta2.")
    train.add_argument("--adam_weight_decay", type=flags.non_negative_number, default=0.0, help="AdamW weight decay.")
    train.add_argument("--adam_epsilon", type=flags.positive_number, default=1e-8, help="AdamW epsilon.")
    train.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (needs a CUDA GPU).")
    train.add_argument("--max_grad_norm", type=flags.positive_number, default=1.0, help="Gradient clipping norm.")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="Mixed precision (default: accelerate's config). Frozen weights are stored in this dtype.")
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")

    ckpt = p.add_argument_group("checkpoints and validation")
    ckpt.add_argument("--checkpointing_steps", type=flags.positive_int, default=500, help="Save a checkpoint-N every N steps.")
    ckpt.add_argument("--checkpoints_total_limit", type=flags.positive_int, default=None, help="Keep at most this many checkpoints.")
    ckpt.add_argument("--resume_from_checkpoint", default=None, type=flags.text, help="A checkpoint-N folder, or 'latest'.")
    ckpt.add_argument("--validation_prompt", action="append", default=None, type=flags.text,
                      help="Prompt for the base | student | teacher grid (repeatable; default: the training prompts).")
    ckpt.add_argument("--validation_steps", type=flags.non_negative_int, default=100,
                      help="Validate every N steps and at the end; 0 validates only at the end.")
    ckpt.add_argument("--num_validation_images", type=flags.positive_int, default=2, help="Rows (seeds) per validation prompt.")
    ckpt.add_argument("--skip_final_validation", action="store_true", help="Do not validate at the end.")
    ckpt.add_argument("--quality_warn_ratio", type=flags.positive_number, default=DEFAULT_QUALITY_WARN_RATIO,
                      help="Warn when the student's few-step detail (high-frequency energy) falls below this fraction "
                           "of the base model's on the validation images (same noise): the turbo ability slipping.")
    ckpt.add_argument("--preview_teacher_only", action="store_true",
                      help="Write a student | teacher grid for the training images and exit without training.")
    ckpt.add_argument("--report_to", default="tensorboard", choices=REPORT_TO, help="Where the training metrics are logged.")
    ckpt.add_argument("--logging_dir", default="logs", type=flags.text, help="TensorBoard folder, relative to --output_dir.")

    hub = p.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the result and its model card.")
    hub.add_argument("--hub_model_id", default=None, type=flags.text, help="Repository on the Hub (default: the output folder's name).")
    hub.add_argument("--hub_token", default=None, type=flags.text, help="Hub token (prefer `hf auth login`).")
    return p


def finalize_args(args: argparse.Namespace) -> type[ModelFamily]:
    """Validate the arguments that need no model, detect the family, and fill family defaults (printed).

    Each flag's own range is checked by its argparse type (dopsd_flags); what is checked here is how flags combine."""
    if (args.instance_data_dir is None) == (args.dataset_name is None):
        raise UserError("pass exactly one of --instance_data_dir FOLDER and --dataset_name NAME.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise UserError("--report_to wandb with --hub_token would leak the token: log in with `hf auth login` instead.")
    # accelerate drops a tracker that is not installed without a word: the run would log nowhere.
    if args.report_to in ("wandb", "tensorboard") and importlib.util.find_spec(args.report_to) is None:
        raise UserError(f"--report_to {args.report_to} needs the {args.report_to} package: `pip install "
                        f"{args.report_to}`, or choose another --report_to.")
    if args.preview_teacher_only and args.method != "dopsd":
        raise UserError("--preview_teacher_only previews the D-OPSD teacher: drop --method sft.")
    if args.teacher_min_pixels > args.teacher_max_pixels:
        raise UserError(f"--teacher_min_pixels {args.teacher_min_pixels} is above --teacher_max_pixels "
                        f"{args.teacher_max_pixels}: lower the first or raise the second.")
    if args.push_to_hub or args.hub_model_id is not None:
        check_repo_id(args)
    check_output_dir(Path(args.output_dir))
    if args.condition_cache_dir is not None:
        check_output_dir(Path(args.condition_cache_dir), "--condition_cache_dir")

    config = load_model_index(args)
    try:
        family = family_class(config["_class_name"], args.task)
    except ValueError as error:
        raise UserError(str(error) + (" Drop --task edit." if args.task == "edit" else "")) from None
    if config.get("is_distilled") is False and args.num_inference_steps is None:
        raise UserError(
            f"{args.pretrained_model_name_or_path} is not step-distilled (is_distilled=false): D-OPSD is for few-step "
            "models; use the distilled checkpoint or pass --num_inference_steps explicitly."
        )
    if args.teacher_prompt_suffix is not None and family.default_teacher_prompt_suffix is None:
        raise UserError(f"--teacher_prompt_suffix is for FLUX.2-klein only: drop it for {family.display_name}.")
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
    if args.lr_scheduler != "constant" and args.lr_warmup_steps > args.max_train_steps:
        raise UserError(f"--lr_warmup_steps {args.lr_warmup_steps} is longer than the whole run (--max_train_steps "
                        f"{args.max_train_steps}): the learning rate would never reach --learning_rate; lower it.")
    if not 1 <= args.rollout_steps <= args.num_inference_steps:
        raise UserError(f"--rollout_steps {args.rollout_steps} must be between 1 and --num_inference_steps {args.num_inference_steps}.")
    if args.rollout_grid == "reference" and (reason := family.check_reference_rollout(args.rollout_steps)):
        raise UserError(f"--rollout_grid reference: {reason}; use --rollout_grid inference.")
    return family


def check_repo_id(args):
    """The Hub repository's name, checked now rather than by the upload at the end of a long run."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = args.hub_model_id or Path(args.output_dir).absolute().name
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        source = "--hub_model_id" if args.hub_model_id else "the --output_dir name (the default --hub_model_id)"
        raise UserError(f"{source} {repo_id!r} is not a Hub repository name: pass --hub_model_id user/name (letters, digits, "
                        "'-', '_' and '.', at most 96 characters).") from None


def check_output_dir(out: Path, flag: str = "--output_dir"):
    """The output folder must be a folder we can write, checked without creating anything."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file: choose a folder.")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {flag} {out} ({existing} is not writable): choose a writable folder.")


def first_line(error: Exception, limit: int = 200) -> str:
    """The error's type and first line, cut at `limit` characters (peft's mismatch error lists every module)."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {line if len(line) <= limit else line[:limit] + ' …'}"


def read_model_config(flag: str, name: str, cache_dir, fix: str):
    """The transformers config of the model a flag names, read before any weights load, or one line saying `fix`."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001 -- not found, offline, gated, not a transformers model: one user problem
        raise UserError(f"cannot read the config of {flag} {name} ({first_line(error)}): {fix}") from None


def check_teacher_vlm(args):
    """The teacher's VLM must be reachable before the base model loads: its config is read, not its weights."""
    read_model_config("--teacher_vlm_name_or_path", args.teacher_vlm_name_or_path, args.cache_dir,
                      "pass a Qwen3-VL Instruct folder or a Hub id this machine can download.")


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
