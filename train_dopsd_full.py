#!/usr/bin/env python
# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""D-OPSD full fine-tuning of step-distilled image models, with an EMA teacher, on accelerate's engines.

    accelerate launch --config_file configs/ddp.yaml train_dopsd_full.py \\
        --pretrained_model_name_or_path Tongyi-MAI/Z-Image-Turbo --dataset_name my/anime-captions --output_dir out

The student is the whole transformer. The teacher is a second copy of it that holds the exponential moving average
of the student's weights (initialised to the starting weights, updated after every optimizer step, fp32 by default)
and never receives gradients. Data, conditions, the rollout, validation and checkpoints are those of the LoRA script
(dopsd_training.py); this file adds only the teacher as a weight copy and saving the full transformer.

The result is out/transformer/ in diffusers format: `ZImagePipeline.from_pretrained(base, transformer=...)`.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

import dopsd_flags as flags
from dopsd_args import UserError, build_parser, finalize_args, run_main
from dopsd_training import ema_update, logger, train
from pipeline_dopsd import weights_dtype

EMA_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_parser():
    parser = build_parser(__doc__.split("\n\n")[0])
    full = parser.add_argument_group("full fine-tuning")
    full.add_argument("--ema_dtype", choices=sorted(EMA_DTYPES), default="fp32",
                      help="Precision of the EMA teacher; bf16 halves its memory but rounds small updates away.")
    full.add_argument("--ema_device", choices=["accelerator", "cpu"], default="accelerator",
                      help="Where the EMA teacher lives; cpu keeps it in host memory and streams it block by block "
                           "to the accelerator for its forwards (diffusers group offloading).")
    full.add_argument("--max_shard_size", default="5GB", type=flags.shard_size,
                      help="Largest safetensors shard of the saved transformer: bytes, or a size in KB, MB, GB or TB.")
    return parser


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    family = finalize_args(args)
    if args.ema_decay == 1.0 and args.method == "dopsd":
        logger.info("--ema_decay 1.0: the teacher stays the starting model")
    return args, family


class FullAdaptation:
    """The student is the transformer itself; the teacher is an EMA weight copy of it, held the way the engine holds
    the student (a replica under data parallel and ZeRO-1/2, sharded like it under ZeRO-3 and FSDP2)."""

    kind = "full"
    frozen_base = False

    @staticmethod
    def transformer_load_kwargs(args, weight_dtype) -> dict:
        return {}

    @staticmethod
    def check_engine(args, engine):
        if args.ema_device == "cpu" and engine.shards_parameters:
            raise UserError(f"--ema_device cpu streams a whole teacher replica, but under {engine.name} the teacher is "
                            "sharded like the student already: drop --ema_device cpu.")

    def __init__(self, args, family, transformer, accelerator, weight_dtype):
        self.args, self.family, self.accelerator = args, family, accelerator
        # Trained weights stay fp32 (mixed precision computes in bf16 under autocast); frozen copies may be smaller.
        self.transformer = transformer.to(torch.float32).requires_grad_(True)
        self.transformer_class = type(transformer)  # FSDP2 swaps the class of the module it shards
        self.model = transformer  # the prepared (possibly wrapped or sharded) model, once accelerate has it
        self.student_dtype = torch.float32  # asked once (see use_prepared): the rollout needs it at every state
        self.compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
        self.numel = sum(p.numel() for p in transformer.parameters())
        self.teacher = None
        if args.method == "dopsd":
            self.teacher = copy.deepcopy(transformer).to(EMA_DTYPES[args.ema_dtype]).requires_grad_(False).eval()
            self.teacher_dtype = EMA_DTYPES[args.ema_dtype]
        logger.info("full fine-tuning: %.1fM trainable parameters; EMA teacher %s on %s", self.numel / 1e6,
                    args.ema_dtype if self.teacher is not None else "none (sft)", args.ema_device)

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def student(self):
        return contextlib.nullcontext()

    def training(self):  # nothing but the student trains here (no --training_adapter for full fine-tuning)
        return contextlib.nullcontext()

    def base(self):
        # Only called before the first optimizer step (the base column is generated once and kept on disk).
        return contextlib.nullcontext()

    def use_prepared(self, model, engine):
        self.model, self.engine = model, engine
        self.student_module = self.accelerator.unwrap_model(model)
        self.student_dtype = weights_dtype(model)  # an engine may have cast the weights (DeepSpeed's bf16 mode does)
        if self.teacher is not None:
            if self.args.ema_device == "cpu":
                self.teacher.to("cpu")
                self.teacher.enable_group_offload(onload_device=self.accelerator.device, offload_device=torch.device("cpu"),
                                                  offload_type="block_level", num_blocks_per_group=1)
            else:
                self.teacher = engine.prepare_teacher(self.teacher, self.teacher_dtype)
        self.register_checkpoint_hooks()

    def parameter_groups(self) -> dict:
        groups = {"student": self.engine.parameters(self.student_module)}
        if self.teacher is not None:
            groups["teacher"] = self.engine.parameters(self.teacher)
        return groups

    def student_velocity(self, model, x, sigma, condition):
        return self.family.velocity(model, x, sigma, condition, dtype=self.student_dtype)

    def _teacher_autocast(self):
        # The student computes in the mixed-precision dtype (under DeepSpeed its weights are cast and
        # accelerator.autocast() does nothing); the teacher, kept in its own precision, computes in the same dtype.
        dtype = self.compute_dtype or (self.teacher_dtype if self.teacher_dtype != torch.float32 else None)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.accelerator.device.type, dtype=dtype)

    @torch.no_grad()
    def teacher_velocity(self, x, sigma, condition):
        with self._teacher_autocast():
            return self.family.velocity(self.teacher, x, sigma, condition, dtype=self.teacher_dtype)

    @torch.no_grad()
    def teacher_sample(self, condition, noise, sigmas):
        if self.teacher is None:
            return self.family.sample(self.transformer, condition, noise, sigmas)
        with self._teacher_autocast():
            return self.family.sample(self.teacher, condition, noise, sigmas)

    def update_teacher(self):
        """teacher <- d * teacher + (1 - d) * student on each rank's own part, from the student's fp32 masters."""
        if self.teacher is None:
            return
        engine, teacher = self.engine, self.engine.parameters(self.teacher)
        ema_update([engine.local(t) for t in teacher], [engine.master(s) for s in engine.parameters(self.student_module)],
                   self.args.ema_decay)
        engine.refresh(teacher)

    def fingerprint(self, role: str) -> torch.Tensor:
        """Of the whole weights, gathered one tensor at a time (collective)."""
        from dopsd_training import fingerprint

        module = self.student_module if role == "student" else self.teacher
        if module is None:
            return fingerprint([])
        return fingerprint(self.engine.full(p, self.engine.master(p) if role == "student" else None)
                           for p in self.engine.parameters(module))

    def expected_numel(self, role: str) -> int:
        return self.numel if role == "student" or self.teacher is not None else 0

    # -- saving -----------------------------------------------------------------------------------------------------------
    def _save_model(self, module, directory):
        """`module` in diffusers format under `directory`, from whole tensors gathered one at a time (collective)."""
        state = self.engine.full_state_dict(module)
        if self.accelerator.is_main_process:
            save_diffusers_model(self.transformer_class, self.student_module.config, state, directory, self.args.max_shard_size)

    def register_checkpoint_hooks(self):
        """checkpoint-N holds the student (through accelerate, sharded engines included), the optimizer and RNG
        state, and the EMA teacher in diffusers format under teacher/."""

        def save_hook(models, weights, output_dir):
            if self.teacher is not None:
                self._save_model(self.teacher, Path(output_dir) / "teacher")

        def load_hook(models, input_dir):
            if self.teacher is not None:
                load_parts(self.engine, self.teacher, Path(input_dir) / "teacher")

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def save_final(self, output_dir):
        self._save_model(self.student_module, Path(output_dir) / "transformer")
        if self.accelerator.is_main_process:
            logger.info("saved the fine-tuned transformer to %s/transformer", output_dir)


def save_diffusers_model(model_class, config, state: dict, directory, max_shard_size):
    """A diffusers model folder (config.json with the real class name, sharded safetensors) from a whole state dict:
    the tensors are assigned to a skeleton built on the meta device, so nothing is copied again."""
    with torch.device("meta"):
        skeleton = model_class.from_config(config)
    skeleton.load_state_dict(state, strict=True, assign=True)
    skeleton.save_pretrained(directory, max_shard_size=max_shard_size)


@torch.no_grad()
def load_parts(engine, module, directory: Path):
    """Each rank's part of every tensor of a diffusers model folder, read one tensor at a time."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    where = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            where.update({key: file for key in f.keys()})
    params = dict(engine.named_parameters(module))
    missing = sorted(set(params) - set(where))
    if missing:
        raise UserError(f"{directory} lacks {len(missing)} teacher weights (e.g. {missing[0]}): resume from a complete checkpoint.")
    for name, p in params.items():
        with safe_open(str(where[name]), framework="pt") as f:
            whole = f.get_tensor(name)
        local = engine.local(p)
        local.copy_(engine.part_of(p, whole.to(local.device, local.dtype)).view_as(local))
    engine.refresh(list(params.values()))


def main(argv=None):
    args, family = parse_args(argv)
    train(args, family, FullAdaptation)


if __name__ == "__main__":
    run_main(main)
