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

from dopsd_args import build_parser, finalize_args, run_main
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
    full.add_argument("--max_shard_size", default="5GB", help="Largest safetensors shard of the saved transformer.")
    return parser


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    family = finalize_args(args)
    if args.ema_decay == 1.0 and args.method == "dopsd":
        logger.info("--ema_decay 1.0: the teacher stays the starting model")
    return args, family


@contextlib.contextmanager
def full_parameters(accelerator, model):
    """The student's full (unsharded) parameters, in the order of `named_parameters` of the unwrapped model.

    Plain data parallel and ZeRO-2 replicate parameters, so they are used as they are. ZeRO-3 and FSDP shard them:
    they are gathered for the duration (so the EMA teacher is a full replica on every rank, updated identically).
    """
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    params = list(unwrapped.parameters())
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield params
    elif kind == DistributedType.FSDP:
        if hasattr(params[0], "full_tensor"):  # FSDP2: DTensor parameters
            yield [p.full_tensor() for p in params]
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(model, writeback=False):
                yield list(unwrapped.parameters())
    else:
        yield params


class FullAdaptation:
    """The student is the transformer itself; the teacher is an EMA weight copy of it."""

    kind = "full"

    @staticmethod
    def transformer_load_kwargs(args, weight_dtype) -> dict:
        return {}

    def __init__(self, args, family, transformer, accelerator, weight_dtype):
        self.args, self.family, self.accelerator = args, family, accelerator
        # Trained weights stay fp32 (mixed precision computes in bf16 under autocast); frozen copies may be smaller.
        self.transformer = transformer.to(torch.float32).requires_grad_(True)
        self.model = transformer  # the prepared (possibly wrapped or sharded) model, once accelerate has it
        self.student_dtype = torch.float32  # asked once (see use_prepared): the rollout needs it at every state
        self.teacher = None
        if args.method == "dopsd":
            self.teacher = copy.deepcopy(transformer).to(EMA_DTYPES[args.ema_dtype]).requires_grad_(False).eval()
            self.teacher_dtype = weights_dtype(self.teacher)
            if args.ema_device == "cpu":
                self.teacher.to("cpu")
                self.teacher.enable_group_offload(onload_device=accelerator.device, offload_device=torch.device("cpu"),
                                                  offload_type="block_level", num_blocks_per_group=1)
        logger.info("full fine-tuning: %.1fM trainable parameters; EMA teacher %s on %s", sum(p.numel() for p in transformer.parameters()) / 1e6,
                    args.ema_dtype if self.teacher is not None else "none (sft)", args.ema_device)

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def student(self):
        return contextlib.nullcontext()

    def base(self):
        # Only called before the first optimizer step (the base column is generated once and kept on disk).
        return contextlib.nullcontext()

    def use_prepared(self, model):
        self.model = model
        self.student_dtype = weights_dtype(model)  # an engine may have cast the weights (DeepSpeed's bf16 mode does)
        self.register_checkpoint_hooks()

    def student_velocity(self, model, x, sigma, condition):
        return self.family.velocity(model, x, sigma, condition, dtype=self.student_dtype)

    def _teacher_autocast(self):
        # The teacher copy was made before accelerate wrapped the student's forward in autocast, and may be bf16
        # while the conditions are not: compute it under autocast of its own dtype (or accelerate's).
        if self.teacher_dtype != torch.float32:
            return torch.autocast(self.accelerator.device.type, dtype=self.teacher_dtype)
        return self.accelerator.autocast()

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
        if self.teacher is None:
            return
        with full_parameters(self.accelerator, self.model) as student:
            ema_update(list(self.teacher.parameters()), student, self.args.ema_decay)

    def checksum(self, role: str) -> torch.Tensor:
        if role == "teacher" and self.teacher is None:
            return torch.zeros((), dtype=torch.float64)
        with full_parameters(self.accelerator, self.model) as student:
            params = student if role == "student" else list(self.teacher.parameters())
            return sum((p.detach().double().sum().cpu() for p in params), torch.zeros((), dtype=torch.float64))

    # -- saving -----------------------------------------------------------------------------------------------------------
    def register_checkpoint_hooks(self):
        """checkpoint-N holds the student (through accelerate, sharded engines included), the optimizer and RNG
        state, and the EMA teacher in diffusers format under teacher/ (written by the main process)."""

        def save_hook(models, weights, output_dir):
            if self.teacher is not None and self.accelerator.is_main_process:
                self.teacher.save_pretrained(Path(output_dir) / "teacher", max_shard_size=self.args.max_shard_size)

        def load_hook(models, input_dir):
            if self.teacher is not None:
                saved = type(self.teacher).from_pretrained(Path(input_dir) / "teacher", torch_dtype=EMA_DTYPES[self.args.ema_dtype])
                with torch.no_grad():
                    for mine, theirs in zip(self.teacher.parameters(), saved.parameters()):
                        mine.copy_(theirs)

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def save_final(self, output_dir):
        state = self.accelerator.get_state_dict(self.model)  # collective under sharded engines
        if self.accelerator.is_main_process:
            unwrapped = self.accelerator.unwrap_model(self.model)
            unwrapped.save_pretrained(Path(output_dir) / "transformer", state_dict=state, max_shard_size=self.args.max_shard_size)
            logger.info("saved the fine-tuned transformer to %s/transformer", output_dir)


def main(argv=None):
    args, family = parse_args(argv)
    train(args, family, FullAdaptation)


if __name__ == "__main__":
    run_main(main)
