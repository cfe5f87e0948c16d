# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""How the trained weights are held under each of accelerate's engines, so that the EMA teacher, saving and the
end-of-run checks are written once for all of them.

An engine answers five questions about a parameter `p` of the prepared model (and of a teacher copy held like it):

* ``master(p)``: this rank's part of p's fp32 master weights, the values the optimizer steps (DeepSpeed's bf16 mode
  keeps them apart from the module's bf16 copy);
* ``local(p)``: this rank's part of p itself, laid out like ``master(p)`` (what a shard-local update writes);
* ``full(p, part)``: the whole tensor, gathered from every rank's ``part`` (default ``local(p)``): collective;
* ``part_of(p, whole)``: this rank's part of a whole tensor laid out like p (for loading);
* ``refresh(params)``: make writes to the local parts visible to the next forward.

Data parallel and ZeRO-1/2 replicate parameters (a part is the whole). ZeRO-3 partitions every parameter into one flat
slice per rank (``p.ds_tensor``); FSDP2 shards each parameter along dim 0 (a DTensor). Both sharded engines keep their
master weights in those shards, so the EMA teacher there is sharded the same way and updated shard by shard, without
gathering the student.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from dopsd_args import UserError

logger = logging.getLogger("dopsd")
_REPORT: dict = {}


def last_report() -> dict:
    """What the last run's engine was and held per rank (for tests and the engine benchmark)."""
    return dict(_REPORT)


def requested_engine() -> str | None:
    """The engine `accelerate launch` was asked for by its config or flags, from the variables it sets."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DEEPSPEED"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    return None


def engine_for(accelerator) -> "Engine":
    """The engine the accelerator really runs, or a UserError when it is not the one the launch asked for."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    asked = requested_engine()
    if asked is not None and kind.name != asked:
        raise UserError(
            f"the launch asked for {asked} but accelerate set up {kind.name} (accelerate builds FSDP and DeepSpeed only "
            "for GPUs): run on GPUs, or launch without the FSDP/DeepSpeed config for plain data parallel."
        )
    if kind == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return DeepSpeedZero3(accelerator) if stage == 3 else DeepSpeedZero12(accelerator, stage)
    if kind == DistributedType.FSDP:
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise UserError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config.")
        return Fsdp2(accelerator)
    return Engine(accelerator)


class Engine:
    """Data parallel (or one process): every rank holds every parameter, and the module's weights are the master."""

    name = "data parallel"
    shards_parameters = False
    owns_gradient_clipping = False

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def describe(self) -> str:
        return f"{self.name} over {self.accelerator.num_processes} process(es)"

    # -- the five questions ---------------------------------------------------------------------------------------------
    def master(self, p: torch.Tensor) -> torch.Tensor:
        return p.detach()

    def local(self, p: torch.Tensor) -> torch.Tensor:
        return p.detach()

    def full(self, p: torch.Tensor, part: torch.Tensor | None = None) -> torch.Tensor:
        return (self.local(p) if part is None else part).detach()

    def part_of(self, p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        return whole

    def refresh(self, params: list[torch.Tensor]):
        pass

    def named_parameters(self, module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
        """The module's parameters as the engine holds them between steps (what the five questions are asked of)."""
        return list(module.named_parameters())

    def parameters(self, module: torch.nn.Module) -> list[torch.Tensor]:
        return [p for _, p in self.named_parameters(module)]

    # -- what the training code asks of the engine ----------------------------------------------------------------------
    def prepare_teacher(self, teacher: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        """A frozen copy of the student held the way the student is (here: a full replica on the device)."""
        return teacher.to(self.accelerator.device)

    def full_state_dict(self, module: torch.nn.Module, parts: dict[str, torch.Tensor] | None = None,
                        keep: callable = lambda name: True) -> dict[str, torch.Tensor]:
        """The module's whole state (parameters from their fp32 masters or the given parts, plus buffers) on the CPU
        of the main process, gathered one tensor at a time so no rank ever holds more than one extra full tensor.
        Collective: every rank must call it."""
        main = self.accelerator.is_main_process
        state = {}
        for name, p in self.named_parameters(module):
            if not keep(name):
                continue
            part = parts[name] if parts is not None and name in parts else (self.master(p) if p.requires_grad else None)
            whole = self.full(p, part)
            if main:
                state[name] = whole.detach().to("cpu", copy=True)
        if main:
            for name, buffer in module.named_buffers():
                if keep(name) and name in module.state_dict():
                    state[name] = buffer.detach().to("cpu", copy=True)
        return state

    def save_state_kwargs(self, frozen_base: bool) -> dict:
        """Extra arguments of accelerator.save_state / load_state (DeepSpeed can leave the frozen base out)."""
        return {}

    def load_state_kwargs(self, frozen_base: bool) -> dict:
        return {}

    def configure(self, args):
        """Settings that must be in place before accelerator.prepare."""

    def grad_norm(self, model, clipped) -> float | None:
        return None if clipped is None else float(clipped)

    def zero3_init_disabled(self):
        return contextlib.nullcontext()


class DeepSpeedZero12(Engine):
    """ZeRO-1/2: parameters replicated, optimizer state (and with 2 gradients) partitioned. In bf16 the module holds a
    bf16 copy and the fp32 masters are partitioned in the optimizer: `master` gathers them (an all-reduce per tensor)."""

    owns_gradient_clipping = True

    def __init__(self, accelerator, stage: int):
        super().__init__(accelerator)
        self.stage = stage
        self.name = f"DeepSpeed ZeRO-{stage}"

    def master(self, p):
        if p.dtype == torch.float32 or not p.requires_grad:
            return p.detach()  # fp32: the optimizer copies its master partition back into the module exactly
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p)

    def configure(self, args):
        configure_deepspeed(self.accelerator, args)

    def save_state_kwargs(self, frozen_base):
        return {"exclude_frozen_parameters": True} if frozen_base else {}

    def load_state_kwargs(self, frozen_base):
        return {"load_module_strict": False} if frozen_base else {}

    def grad_norm(self, model, clipped):
        norm = model.get_global_grad_norm()
        return None if norm is None else float(norm)

    def prepare_teacher(self, teacher, dtype):
        return teacher.to(self.accelerator.device)


class DeepSpeedZero3(DeepSpeedZero12):
    """ZeRO-3: every parameter partitioned into one flat slice per rank (`p.ds_tensor`), gathered module by module for
    its forward. The fp32 master of a slice lives in the optimizer (`safe_get_local_fp32_param`)."""

    shards_parameters = True

    def __init__(self, accelerator):
        super().__init__(accelerator, 3)

    def master(self, p):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p)

    def local(self, p):
        return p.ds_tensor.detach()[: p.partition_numel()]

    @torch.no_grad()
    def full(self, p, part=None):
        import torch.distributed as dist

        part = (self.local(p) if part is None else part).detach()
        group = p.ds_process_group if getattr(p, "ds_process_group", None) is not None else None
        world = dist.get_world_size(group=group)
        gathered = torch.empty(world * part.numel(), dtype=part.dtype, device=part.device)
        dist.all_gather_into_tensor(gathered, part.contiguous(), group=group)
        return gathered[: p.ds_numel].view(p.ds_shape)

    def part_of(self, p, whole):
        import torch.distributed as dist

        size = p.partition_numel()
        flat = torch.zeros(size * dist.get_world_size(), dtype=whole.dtype, device=whole.device)
        flat[: whole.numel()] = whole.flatten()
        return flat[dist.get_rank() * size : (dist.get_rank() + 1) * size]

    def refresh(self, params):
        # Small "persistent" parameters stay gathered between forwards: re-gather them from their updated slices, as
        # DeepSpeed's optimizer does for the student after its step.
        persistent = [p for p in params if getattr(p, "ds_persist", False)]
        if persistent:
            persistent[0].partition(param_list=persistent)
            persistent[0].all_gather(param_list=persistent)

    def prepare_teacher(self, teacher, dtype):
        """The teacher as a parameter-partitioned DeepSpeed module (no optimizer), partitioned like the student."""
        import copy

        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler", "gradient_clipping"):
            config.pop(key, None)
        config["bf16"] = {"enabled": dtype == torch.bfloat16}
        config["fp16"] = {"enabled": dtype == torch.float16}
        zero = config.setdefault("zero_optimization", {})
        zero["stage"] = 3
        # Every teacher parameter partitioned (none kept gathered), so that shard-local EMA updates are what it uses.
        zero["stage3_param_persistence_threshold"] = 0
        for key, value in list(zero.items()):
            if value == "auto":
                zero.pop(key)
        config["train_micro_batch_size_per_gpu"] = config.get("train_micro_batch_size_per_gpu", 1)
        config.pop("train_batch_size", None)
        config["gradient_accumulation_steps"] = 1
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        return engine.module.eval()

    @contextlib.contextmanager
    def zero3_init_disabled(self):
        """Models built inside load whole. accelerate registers transformers' HfDeepSpeedConfig for every ZeRO-3 plugin
        (whatever zero3_init_flag says), and transformers then builds every from_pretrained model partitioned: the
        frozen encoders and the teacher's VLM must not be."""
        import transformers.integrations.deepspeed as hf_deepspeed

        registered = hf_deepspeed._hf_deepspeed_config_weak_ref
        hf_deepspeed.unset_hf_deepspeed_config()
        try:
            yield
        finally:
            hf_deepspeed._hf_deepspeed_config_weak_ref = registered


class Fsdp2(Engine):
    """FSDP2: each parameter a DTensor sharded along dim 0 across ranks; its local shard is the fp32 master."""

    name = "FSDP2"
    shards_parameters = True

    def local(self, p):
        return p.to_local().detach()

    master = local

    def named_parameters(self, module):
        # FSDP2 never reshards the root module after a forward without backward (the teacher's, a validation's): its
        # parameters stay registered as plain unsharded tensors until resharded here.
        from torch.distributed.fsdp import FSDPModule

        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        return list(module.named_parameters())

    @torch.no_grad()
    def full(self, p, part=None):
        from torch.distributed.tensor import DTensor

        if part is None:
            return p.full_tensor().detach()
        return DTensor.from_local(part, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()

    def part_of(self, p, whole):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()

    def prepare_teacher(self, teacher, dtype):
        """The teacher sharded with the student's own plan (accelerate's FSDP2 preparation), no optimizer."""
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(self.accelerator, teacher.to(self.accelerator.device)).eval()


def configure_deepspeed(accelerator, args):
    """DeepSpeed clips gradients inside its engine, from its config: make that --max_grad_norm, or refuse a conflict."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    clip = config.get("gradient_clipping", "auto")
    if clip in ("auto", None):
        config["gradient_clipping"] = args.max_grad_norm
    elif float(clip) != float(args.max_grad_norm):
        raise UserError(
            f"the DeepSpeed config clips gradients at {clip} but --max_grad_norm is {args.max_grad_norm}: DeepSpeed "
            "clips inside its engine, so make the two agree."
        )
    # No dataloader goes through prepare(), so DeepSpeed is told the micro-batch size here.
    config["train_micro_batch_size_per_gpu"] = args.train_batch_size


def held_bytes(engine: Engine, params) -> tuple[int, int, int]:
    """(bytes this rank holds, bytes of the whole tensors, bytes of the largest whole tensor) of some parameters: the
    last is the most a rank gathers at once when it saves or checks the weights."""
    held = whole = largest = 0
    for p in params:
        part = engine.local(p)
        size = p.numel() * p.element_size() if not hasattr(p, "ds_numel") else p.ds_numel * part.element_size()
        held, whole, largest = held + part.numel() * part.element_size(), whole + size, max(largest, size)
    return held, whole, largest


def report(engine: Engine, **groups):
    """Log (and remember for tests) what the engine is and how many parameter bytes this rank holds per group."""
    _REPORT.clear()
    _REPORT.update(engine=engine.name, processes=engine.accelerator.num_processes)
    lines = []
    for name, params in groups.items():
        held, whole, largest = held_bytes(engine, params)
        _REPORT.update({f"{name}_bytes": held, f"{name}_whole_bytes": whole, f"{name}_largest_bytes": largest})
        lines.append(f"{name} {held / 2**20:.1f} of {whole / 2**20:.1f} MiB")
    logger.info("engine: %s; parameters held by this rank: %s; saving gathers one whole tensor at a time", engine.describe(),
                ", ".join(lines))
