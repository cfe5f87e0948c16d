# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""Training-step benchmark: time and peak memory of one D-OPSD (or SFT) optimizer iteration, each configuration in a
fresh process, against three targets.

    python benchmarks/bench_train_step.py                                    # tiny models, a few seconds per config
    python benchmarks/bench_train_step.py --size small --rollout_steps 1,8   # tens of millions of parameters, 256 px
    python benchmarks/bench_train_step.py --size real --family klein         # real architectures, random weights (CUDA)

What is measured is the project's own code, called as train() calls it: the transformer wrapped by
train_dopsd_lora.LoraAdaptation and prepared by accelerate (bf16 autocast on a GPU, one accumulation micro-batch per
rollout state), an iteration = dopsd_training.dopsd_step with one backward per state (or sft_step), gradient clipping,
AdamW and the EMA teacher update. Tiny models are the saved ones of tools/make_tiny_models.py with their real encoders;
small and real transformers get random weights (same memory and time as trained ones) and synthetic conditions of the
real shapes, so nothing is downloaded. Below the real sizes, a reference row keeps every state's graph until one
backward (what per-state backward avoids), to show that the memory measurement sees the difference.

Targets (each a ratio within one run on one machine):
  * memory: peak of dopsd at the largest rollout-step count <= 1.15 x at the smallest (1 and 8 by default);
  * time: a dopsd iteration <= 1.15 x rollout_steps x (student forward+backward + teacher forward), both measured in the
    same process at one rollout state;
  * residency: in the training loop, parameters on the training device <= 1.05 x the transformer's own (adapters
    included), measured through dopsd_training.Run on the tiny models (on a CPU, where device and host are one, every
    parameter alive in the process is counted, with validation off).

Every run also times, at the real architectures built on the meta device (so on any machine), the host work the training
code does per rollout state outside the forwards (adapter switching, the transformer's dtype), beside what peft's
set_adapter and diffusers' `.dtype` would cost there.

Peak memory is torch.cuda.max_memory_allocated on a GPU, weights included. On a CPU it is exact too and means the same:
the tensors alive when one more iteration begins (every storage reachable from Python, once), plus the peak of what
that iteration allocates above them, read from the CPU allocator's running total that PyTorch's profiler attaches to
each allocation event. The growth above the start is shown on its own (activations, gradients, transients). The
process's peak resident set (VmHWM) is shown too; it also holds what the C allocator keeps, so it is no measure of the
code.

The table goes between <!-- bench:start --> and <!-- bench:end --> of BENCHMARKS.md, one block per --size (a run replaces
the block of its size); other sections are left as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tools")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

MEMORY_TARGET, TIME_TARGET, RESIDENT_TARGET = 1.15, 1.15, 1.05
SECTION_START, SECTION_END = "<!-- bench:start -->", "<!-- bench:end -->"
TINY_MODELS = REPO_ROOT / "tiny_models"
WARMUP_ITERATIONS = 1  # the first iteration creates the AdamW states; later ones are steady
PROMPT = "a photo of [V] toy on a wooden table, soft daylight, shallow depth of field"
# Synthetic conditions for small and real sizes, in tokens. Z-Image: a long (~100-word) prompt is ~128 Qwen3 tokens; the
# teacher's Qwen3-VL view of the target image adds (pixels / 32^2) tokens within --teacher_min/max_pixels (512^2..768^2).
# klein pads every prompt to 512 tokens; its teacher adds the reference image at the training resolution.
PROMPT_TOKENS = 128
TEACHER_IMAGE_TOKENS = (256, 576)
KLEIN_TEXT_TOKENS = 512


@dataclass(frozen=True)
class ModelSpec:
    family: str  # zimage | klein
    size: str  # tiny | small | real
    name: str
    config: dict | None  # transformer config; None for tiny (the saved tiny pipeline is loaded)
    rank: int
    lora_alpha: int
    resolutions: tuple[int, ...]
    text_hidden: int = 2560  # hidden size of the text encoder (Qwen3-4B; klein-9B: Qwen3-8B)


_KLEIN = dict(patch_size=1, in_channels=128, attention_head_dim=128, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
              guidance_embeds=False)
SPECS = [
    ModelSpec("zimage", "tiny", "tiny Z-Image", None, 8, 8, (64,)),
    ModelSpec("klein", "tiny", "tiny klein", None, 8, 8, (64,)),
    # Tens of millions of parameters; at 256 px the activations outweigh weights, gradients and optimizer states.
    ModelSpec("zimage", "small", "small Z-Image (41M)",
              dict(dim=512, n_layers=6, n_refiner_layers=2, n_heads=8, n_kv_heads=8, cap_feat_dim=2560,
                   axes_dims=[16, 24, 24], axes_lens=[1536, 512, 512]), 16, 32, (256,)),
    ModelSpec("klein", "small", "small klein (46M)",
              {**_KLEIN, "attention_head_dim": 64, "axes_dims_rope": (16, 16, 16, 16), "num_layers": 2,
               "num_single_layers": 6, "num_attention_heads": 8, "joint_attention_dim": 3 * 2560}, 16, 32, (256,)),
    # diffusers_internals.md 1.5 and 2.2.
    ModelSpec("zimage", "real", "Z-Image-Turbo 6B", dict(axes_lens=[1536, 512, 512]), 64, 128, (512, 768, 1024)),
    ModelSpec("klein", "real", "FLUX.2-klein 4B",
              {**_KLEIN, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 3 * 2560},
              64, 128, (512, 768, 1024)),
    ModelSpec("klein", "real", "FLUX.2-klein 9B",
              {**_KLEIN, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32, "joint_attention_dim": 3 * 4096},
              64, 128, (512, 768, 1024), text_hidden=4096),
]


@dataclass(frozen=True)
class Config:
    model: str
    resolution: int
    method: str  # sft | dopsd
    rollout_steps: int
    gradient_checkpointing: bool
    repeats: int
    threads: int
    backward: str = "per_state"  # per_state (the training code) | once (the reference: all states' graphs kept)

    @property
    def spec(self) -> ModelSpec:
        return next(s for s in SPECS if s.name == self.model)


# ----------------------------------------------------------------------------------------------------------------------
# Memory and time


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_dtype(dev: torch.device) -> torch.dtype:
    """bf16 on a GPU, as the real models train; fp32 on a CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_memory():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS (VmHWM) to the current RSS


def live_tensor_mb(dev: torch.device) -> float:
    """Bytes of the tensors alive on `dev`, each storage once. Called between iterations, when every tensor (weights,
    adapters, gradients, optimizer states, conditions) is reachable from Python."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device == dev:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


def cpu_tensor_growth_mb(fn) -> float:
    """Peak bytes of CPU tensors allocated while `fn` runs, above those alive before it.

    Read from the CPU allocator's running total as PyTorch's profiler reports every allocation and free: exact, where
    the process's resident set also holds what the C allocator keeps and rounds to pages.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields))
    allocations.sort(key=lambda pair: pair[0])
    before = allocations[0][1].total_allocated - allocations[0][1].alloc_size
    return (max(fields.total_allocated for _, fields in allocations) - before) / 2**20


def timed(fn) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------------
# Models and conditions


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_family(spec: ModelSpec, dtype, on: torch.device | None = None):
    """The family object around a transformer on the device (or `on`): the tiny saved pipeline, or random weights."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )

    from pipeline_dopsd import Flux2KleinFamily, ZImageFamily

    family_cls = ZImageFamily if spec.family == "zimage" else Flux2KleinFamily
    if spec.config is None:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(TINY_MODELS / ("z-image" if spec.family == "zimage" else "flux2-klein")), dtype=dtype)
        family = family_cls(pipe)
        if spec.family == "zimage":
            family.load_teacher_encoder(str(TINY_MODELS / "qwen3-vl-teacher"), 32 * 32, 64 * 64)
    else:
        transformer_cls = ZImageTransformer2DModel if spec.family == "zimage" else Flux2Transformer2DModel
        # Built directly on the device in the training dtype: a 9B model never exists in fp32 or on the host.
        with torch.device(on or device()), default_dtype(dtype):
            transformer = transformer_cls(**spec.config)
        # The schedulers of the real scheduler_config.json files; with vae=None the pipelines assume the real VAE's
        # 8x downsampling, so token counts are the real ones.
        if spec.family == "zimage":
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
            pipe = ZImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                        base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                        max_image_seq_len=4096, time_shift_type="exponential")
            pipe = Flux2KleinPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer,
                                      is_distilled=True)
        family = family_cls(pipe)
    return family


def make_conditions(family, spec: ModelSpec, resolution: int, dtype):
    """(student condition, teacher condition, clean latents x0) for one sample, collated on the device."""
    dev = device()
    if spec.config is None:
        from PIL import Image

        from dopsd_data import image_tensor

        generator = torch.Generator().manual_seed(0)
        pixels = (torch.rand(resolution, resolution, 3, generator=generator) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels)
        student = family.encode_student([PROMPT])[0]
        teacher = family.encode_teacher([PROMPT], [image])[0]
        x0 = family.encode_images(image_tensor(image))
        return family.collate([student], dev), family.collate([teacher], dev), x0.to(dev)

    generator = torch.Generator(dev).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=dev, dtype=dtype)

    x0 = family.initial_noise(1, resolution, resolution, generator, dev)
    if spec.family == "zimage":
        image_tokens = min(max(resolution**2 // 32**2, TEACHER_IMAGE_TOKENS[0]), TEACHER_IMAGE_TOKENS[1])
        student = {"caption": randn(PROMPT_TOKENS, spec.text_hidden)}
        teacher = {"caption": randn(PROMPT_TOKENS + image_tokens, spec.text_hidden)}
    else:
        pipe = family.pipe
        embeds = randn(1, KLEIN_TEXT_TOKENS, 3 * spec.text_hidden)
        student = {"prompt_embeds": embeds, "text_ids": pipe._prepare_text_ids(embeds).to(dev)}
        reference = randn(*x0.shape)  # the target image's latents, at the training resolution
        teacher = {**student, "reference_latents": pipe._pack_latents(reference),
                   "reference_ids": pipe._prepare_image_ids([reference]).to(dev)}
    return family.collate([student], dev), family.collate([teacher], dev), x0


def lora_args(spec: ModelSpec, method: str) -> argparse.Namespace:
    """The arguments LoraAdaptation reads, at train_dopsd_lora.py's defaults except the rank and klein's layers (the
    larger preset, "all", as BENCHMARKS.md and the README's memory figures were measured; Z-Image's presets are equal)."""
    return argparse.Namespace(rank=spec.rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0, lora_layers=None, lora_preset="all", method=method,
                              ema_decay=0.9999, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0,
                              adam_epsilon=1e-8, use_8bit_adam=False, max_grad_norm=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# One configuration (runs in its own process)


def measure(config: Config) -> dict:
    from accelerate import Accelerator

    from dopsd_engines import engine_for
    from dopsd_training import distillation_loss, dopsd_step, make_optimizer, rollout_sigmas, sample_sft_sigmas, sft_step
    from train_dopsd_lora import STUDENT, TEACHER, LoraAdaptation

    torch.set_num_threads(config.threads)
    spec, dev = config.spec, device()
    dtype = training_dtype(dev)
    torch.manual_seed(0)
    family = build_family(spec, dtype)
    student_condition, teacher_condition, x0 = make_conditions(family, spec, config.resolution, dtype)
    family.drop_encoders(keep_vae=False)  # conditions are made: as in Run without validation, only the transformer stays
    transformer = family.transformer.to(dev)
    transformer.requires_grad_(False)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    args = lora_args(spec, config.method)
    rollout_steps = config.rollout_steps
    # As in Run and train(): every rollout state is one micro-batch of accumulation (accelerator.backward divides by the
    # steps), and on a GPU the student runs under accelerate's bf16 autocast, which decides what its graph keeps.
    per_state = config.method == "dopsd" and config.backward == "per_state"
    accelerator = Accelerator(cpu=dev.type == "cpu", mixed_precision="bf16" if dtype == torch.bfloat16 else "no",
                              gradient_accumulation_steps=rollout_steps if per_state else 1)
    adaptation = LoraAdaptation(args, family, transformer, accelerator, weight_dtype=dtype)
    model, optimizer = accelerator.prepare(transformer, make_optimizer(args, adaptation.trainable_parameters()))
    adaptation.use_prepared(model, engine_for(accelerator))
    student = lambda x, sigma: adaptation.student_velocity(model, x, sigma, student_condition)
    teacher = lambda x, sigma: adaptation.teacher_velocity(x, sigma, teacher_condition)
    generator = torch.Generator(dev).manual_seed(1)
    # klein's native 4-step schedule cannot hold 8 states; the cost of a state does not depend on its sigma.
    sigmas = rollout_sigmas(family.sigmas(max(family.native_steps, rollout_steps), config.resolution, config.resolution, dev), rollout_steps)

    def rollout():
        noise = family.initial_noise(1, config.resolution, config.resolution, generator, dev)
        with adaptation.student():
            if per_state:
                return dopsd_step(student, teacher, noise, sigmas, "x0", accelerator.backward, lambda: accelerator.accumulate(model))
            with accelerator.accumulate(model):
                if config.method == "sft":
                    sigma = sample_sft_sigmas(family, 1, config.resolution, config.resolution, generator, dev)
                    return [sft_step(student, x0, noise, sigma, accelerator.backward)]
                kept = []  # the reference: every state's graph stays alive until one backward of their mean
                dopsd_step(student, teacher, noise, sigmas, "x0", kept.append)
                accelerator.backward(torch.stack(kept).mean())
                return kept

    def update(losses):
        torch.stack(losses).mean().item()  # train() reads the loss every step (a device sync)
        accelerator.clip_grad_norm_(adaptation.trainable_parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        adaptation.update_teacher()

    # The floor's parts, at the first rollout state: the student's forward+backward, the teacher's bare forward (its
    # adapter set once), and the teacher forward as the training code calls it (adapters switched there and back).
    x, sigma = family.initial_noise(1, config.resolution, config.resolution, generator, dev), sigmas[0]
    with torch.no_grad():
        target = teacher(x, sigma) if config.method == "dopsd" else torch.zeros_like(x)  # SFT has no teacher adapter

    def student_forward_backward():
        with adaptation.student():
            (distillation_loss(x, sigma, student(x, sigma), target, "x0") / rollout_steps).backward()

    def bare_teacher_forward_time():
        adaptation._activate(TEACHER)  # outside the timing: the training code's switch is what teacher_switched_f adds
        with torch.no_grad():
            seconds = timed(lambda: family.velocity(transformer, x, sigma, teacher_condition, dtype=adaptation.dtype))
        adaptation._activate(STUDENT)
        return seconds

    times = {"rollout": [], "update": [], "student_fb": [], "teacher_f": [], "teacher_switched_f": []}

    def one_round(record: bool):
        # The iteration and the floor's parts alternate, so that other load on the machine hits them alike.
        losses = []
        sample = {"rollout": timed(lambda: losses.extend(rollout())), "update": timed(lambda: update(losses)),
                  "student_fb": timed(student_forward_backward)}
        optimizer.zero_grad(set_to_none=True)  # the floor's gradients must not reach the next optimizer step
        if config.method == "dopsd":
            sample.update(teacher_f=bare_teacher_forward_time(), teacher_switched_f=timed(lambda: teacher(x, sigma)))
        if record:
            for name, seconds in sample.items():
                times[name].append(seconds)

    for _ in range(WARMUP_ITERATIONS):
        one_round(record=False)
    gc.collect()
    start_mb = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None
    reset_peak_memory()
    for _ in range(config.repeats):
        one_round(record=True)
    peak_rss_mb = _proc_status_mb("VmHWM")
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        above_start_mb = peak_mb - start_mb
    else:  # one more iteration, with the allocator's accounting
        start_mb = live_tensor_mb(dev)
        above_start_mb = cpu_tensor_growth_mb(lambda: update(rollout()))
        peak_mb = start_mb + above_start_mb

    median = {name: statistics.median(values) if values else None for name, values in times.items()}
    return {
        **asdict(config),
        "iteration_s": statistics.median(r + u for r, u in zip(times["rollout"], times["update"])),
        "rollout_s": median["rollout"], "update_s": median["update"], "student_fb_s": median["student_fb"],
        "teacher_f_s": median["teacher_f"], "teacher_switched_f_s": median["teacher_switched_f"],
        "floor_s": rollout_steps * (median["student_fb"] + median["teacher_f"]) if config.method == "dopsd" else None,
        # Each round's iteration against the floor timed in that same round, so that a slow spell of a shared machine
        # weighs on both sides of a ratio; the target reads the median of these.
        "time_per_floor": statistics.median(
            (r + u) / (rollout_steps * (s + t))
            for r, u, s, t in zip(times["rollout"], times["update"], times["student_fb"], times["teacher_f"])
        ) if config.method == "dopsd" else None,
        "peak_mb": peak_mb, "above_start_mb": above_start_mb, "peak_rss_mb": peak_rss_mb,
        "transformer_params": sum(p.numel() for p in transformer.parameters()),
        "trainable_params": sum(p.numel() for p in adaptation.trainable_parameters()),
        "loadavg": os.getloadavg()[0],
    }


def measure_resident(family_name: str, threads: int) -> dict:
    """Parameters held in the training loop, once dopsd_training.Run has cached the conditions (the tiny models).

    On a GPU: every parameter alive on the training device, with validation on (the VAE waits on the host between
    validations). On a CPU that device is also the host, so the count is stricter: every parameter alive in the process,
    with validation off (nothing will decode, so the VAE is dropped with the encoders).
    """
    from make_tiny_models import build_tiny_models

    from dopsd_training import Run
    from train_dopsd_lora import LoraAdaptation, parse_args

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    tiny = build_tiny_models(TINY_MODELS)
    model = tiny / ("z-image" if family_name == "zimage" else "flux2-klein")
    with tempfile.TemporaryDirectory() as output_dir:
        argv = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(REPO_ROOT / "examples" / "tiny_concept"),
                "--output_dir", output_dir, "--resolution", "64", "--rank", "8", "--lora_alpha", "8", "--report_to", "none",
                "--mixed_precision", "bf16" if cuda else "no"]
        argv += [] if cuda else ["--validation_steps", "0", "--skip_final_validation"]
        if family_name == "zimage":
            argv += ["--teacher_vlm_name_or_path", str(tiny / "qwen3-vl-teacher"), "--teacher_min_pixels", "1024", "--teacher_max_pixels", "4096"]
        args, family_cls = parse_args(argv)
        run = Run(args, family_cls, LoraAdaptation)
        gc.collect()
        alive = {p.data_ptr(): p.numel() for p in gc.get_objects()
                 if isinstance(p, torch.nn.Parameter) and (not cuda or p.device == run.device)}
        own = sum(p.numel() for p in run.transformer.parameters())
    return {"kind": "resident", "family": family_name, "resident_params": sum(alive.values()), "transformer_params": own,
            "where": f"on {run.device}, validation on" if cuda else "alive in the process, validation off"}


def measure_host_overhead(threads: int) -> list[dict]:
    """Host time the training code spends per rollout state outside the forwards, at the real architectures.

    The transformers are built on PyTorch's meta device (no memory, no weights) with the two rank-64 adapters of
    LoraAdaptation. Per state the code switches to the teacher and back; peft's own switch, and diffusers' `.dtype`
    (which the families need per forward, and LoraAdaptation asks once per run), are timed beside it: host work that a
    GPU cannot hide once it is as long as a forward.
    """
    from pipeline_dopsd import weights_dtype
    from train_dopsd_lora import STUDENT, TEACHER, LoraAdaptation

    torch.set_num_threads(threads)

    def per_call_ms(fn, calls=20):
        fn()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls * 1000

    rows = []
    for spec in (s for s in SPECS if s.size == "real"):
        family = build_family(spec, torch.bfloat16, on=torch.device("meta"))
        transformer = family.transformer.requires_grad_(False)
        with torch.device("meta"):  # the adapters too
            adaptation = LoraAdaptation(lora_args(spec, "dopsd"), family, transformer, None, torch.bfloat16)

        def peft_switch(adapter):
            transformer.set_adapter(adapter)
            adaptation._freeze_teacher()  # peft's set_adapter leaves the active adapter trainable

        rows.append({
            "model": spec.name, "lora_layers": len(adaptation.lora_layers),
            "lora_params": sum(p.numel() for p in adaptation.student_params),
            "switch_ms": per_call_ms(lambda: (adaptation._activate(TEACHER), adaptation._activate(STUDENT))),
            "peft_switch_ms": per_call_ms(lambda: (peft_switch(TEACHER), peft_switch(STUDENT))),
            "dtype_ms": per_call_ms(lambda: weights_dtype(transformer)),
        })
        adaptation._activate(STUDENT)
    return rows


def host_overhead_table(rows: list[dict]) -> list[str]:
    lines = ["| model (meta device) | LoRA layers | LoRA parameters per adapter | switch there and back ms | "
             "the same with peft's set_adapter ms | one `.dtype` ms |", "|" + "---|" * 6]
    for r in rows:
        lines.append(f"| {r['model']} | {r['lora_layers']} | {r['lora_params'] / 1e6:.1f} M | {r['switch_ms']:.2f} "
                     f"| {r['peft_switch_ms']:.1f} | {r['dtype_ms']:.1f} |")
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# The driver: one subprocess per configuration, then the table


def configurations(args) -> list[Config]:
    specs = [s for s in SPECS if s.size == args.size and args.family in (s.family, "both")]
    checkpointing = {"both": (False, True), "off": (False,), "on": (True,)}[args.gradient_checkpointing]
    configs = []
    for spec in specs:
        for resolution in args.resolutions or spec.resolutions:
            for gc_on in checkpointing:
                common = dict(model=spec.name, resolution=resolution, gradient_checkpointing=gc_on, repeats=args.repeats, threads=args.threads)
                configs.append(Config(method="sft", rollout_steps=1, **common))
                configs += [Config(method="dopsd", rollout_steps=k, **common) for k in args.rollout_steps]
                # The reference implementation (one backward over all states) shows what the memory metric catches;
                # at real sizes it only finds out how soon the GPU runs out of memory.
                if spec.size != "real":
                    configs.append(Config(method="dopsd", rollout_steps=max(args.rollout_steps), backward="once", **common))
    return configs


def run_isolated(payload: dict) -> dict | list:
    """Run one measurement in a fresh Python process; a failure (e.g. out of memory) becomes an error row."""
    env = {**os.environ, "OMP_NUM_THREADS": str(payload["threads"])}
    result = subprocess.run([sys.executable, __file__, "--one-config", json.dumps(payload)], capture_output=True, text=True,
                            env=env, cwd=REPO_ROOT, check=False)
    if result.returncode != 0:
        tail = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return {**payload, "error": tail[-1][:200] if tail else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def ratio_verdict(ratio: float | None, target: float) -> str:
    if ratio is None:
        return "n/a"
    if ratio <= target:
        return f"{ratio:.3f} PASS (target {target})"
    return f"{ratio:.3f} MISS by {100 * (ratio / target - 1):.1f}% (target {target})"


def memory_of(row: dict) -> float | None:
    """The memory the targets compare: the peak of live tensors, weights included, on either device."""
    return None if "error" in row else row["peak_mb"]


def summarise(rows: list[dict], rollout_steps: list[int], residents: list[dict]) -> list[str]:
    lines = []
    low, high = min(rollout_steps), max(rollout_steps)
    groups = {}
    for row in rows:
        groups.setdefault((row["model"], row["resolution"], row["gradient_checkpointing"]), []).append(row)
    for (model, resolution, gc_on), group in groups.items():
        name = f"{model}, {resolution} px, checkpointing {'on' if gc_on else 'off'}"
        per_state = {r["rollout_steps"]: r for r in group if r["method"] == "dopsd" and r["backward"] == "per_state"}
        if low in per_state and high in per_state and low != high:
            a, b = memory_of(per_state[low]), memory_of(per_state[high])
            difference = f" ({b - a:+.2f} MB)" if a is not None and b is not None else ""
            lines.append(f"- memory {high} vs {low} rollout steps, {name}: "
                         + ratio_verdict(b / a if a and b is not None else None, MEMORY_TARGET) + difference)
            once = next((r for r in group if r["backward"] == "once"), None)
            if once is not None and memory_of(once) is not None and a:
                lines.append(f"  - reference (one backward over all {high} states): {memory_of(once) / a:.2f}x")
        ratios = {k: r["time_per_floor"] for k, r in sorted(per_state.items()) if "error" not in r}
        if ratios:
            worst = max(ratios, key=ratios.get)
            lines.append(f"- time / floor, {name}: worst at {worst} steps " + ratio_verdict(ratios[worst], TIME_TARGET)
                         + " (" + ", ".join(f"{k}: {v:.2f}" for k, v in ratios.items()) + ")")
    for r in residents:
        if "error" in r:
            lines.append(f"- resident parameters, tiny {r['family']} through Run: error {r['error']}")
        else:
            ratio = r["resident_params"] / r["transformer_params"]
            lines.append(f"- resident parameters ({r['where']}) / transformer's own with its adapters, tiny {r['family']} "
                         f"through Run: {r['resident_params']:,} / {r['transformer_params']:,} = " + ratio_verdict(ratio, RESIDENT_TARGET))
    return lines


def fmt(value, scale=1.0, digits=3):
    return "" if value is None else f"{value * scale:.{digits}f}"


def table(rows: list[dict]) -> list[str]:
    header = ("| model | px | method | steps | ckpt | iteration s | rollout s | update s | student f+b s | teacher f s "
              "| teacher switch ms | floor s | time/floor | peak MB | above start MB | peak RSS MB | load |")
    lines = [header, "|" + "---|" * 17]
    for r in rows:
        method = r["method"] + (" (one backward)" if r.get("backward") == "once" else "")
        head = f"| {r['model']} | {r['resolution']} | {method} | {r['rollout_steps']} | {'on' if r['gradient_checkpointing'] else 'off'} |"
        if "error" in r:
            lines.append(head + f" error: {r['error']} |" + " |" * 11)
            continue
        switch = (r["teacher_switched_f_s"] - r["teacher_f_s"]) if r["teacher_f_s"] is not None else None
        ratio = r["time_per_floor"]
        lines.append(head + f" {fmt(r['iteration_s'])} | {fmt(r['rollout_s'])} | {fmt(r['update_s'])} | {fmt(r['student_fb_s'])} "
                     f"| {fmt(r['teacher_f_s'])} | {fmt(switch, 1000, 1)} | {fmt(r['floor_s'])} | {fmt(ratio, digits=2)} "
                     f"| {fmt(r['peak_mb'], digits=0)} | {fmt(r['above_start_mb'], digits=2)} | {r['peak_rss_mb']:.0f} "
                     f"| {r['loadavg']:.1f} |")
    return lines


def machine() -> str:
    import diffusers
    import peft
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"{cpu}, {usable} usable cores; GPU: {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")


SECTION_INTRODUCTION = """## Training step: time and memory (`benchmarks/bench_train_step.py`)

One iteration = `dopsd_step` with one backward per state (or `sft_step`) + gradient clipping + AdamW + EMA teacher update,
batch 1, LoRA through `LoraAdaptation`; each configuration in a fresh process. Floor = steps x (student forward+backward +
bare teacher forward) at one state, timed alternately with the iterations; time/floor = the median over rounds of each
round's iteration over the floor timed in the same round (so it can differ from the ratio of the two medians shown);
teacher switch = the extra time of the training code's teacher call (adapter switched there and back) over the bare
forward. One block per `--size`, replaced by the next run of that size."""


def size_markers(size: str) -> tuple[str, str]:
    return f"<!-- bench:{size}:start -->", f"<!-- bench:{size}:end -->"


def write_block(path: Path, size: str, block: str):
    """Put this size's block into the bench section of `path`, keeping the other sizes' blocks and every other section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section, after = "", "\n"
    if SECTION_START in text and SECTION_END in text:
        text, rest = text.split(SECTION_START, 1)
        section, after = rest.split(SECTION_END, 1)
    else:
        text = text.rstrip("\n") + "\n\n"
    blocks = {}
    for name in ("tiny", "small", "real"):
        start, end = size_markers(name)
        if start in section and end in section:
            blocks[name] = start + section.split(start, 1)[1].split(end, 1)[0] + end
    start, end = size_markers(size)
    blocks[size] = f"{start}\n{block.strip()}\n{end}"
    ordered = [blocks[name] for name in ("tiny", "small", "real") if name in blocks]
    path.write_text(text + "\n\n".join([SECTION_START + "\n" + SECTION_INTRODUCTION, *ordered]) + "\n" + SECTION_END + after)


def comma_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "small", "real"], default="tiny",
                   help="tiny (default): the saved tiny models, seconds per configuration; small: 41-46M-parameter "
                        "transformers at 256 px, about a minute per configuration on a CPU; real: Z-Image-Turbo 6B, "
                        "FLUX.2-klein 4B and 9B with random weights in bf16 (needs CUDA).")
    p.add_argument("--family", choices=["zimage", "klein", "both"], default="both", help="Model families (default: both).")
    p.add_argument("--rollout_steps", type=comma_ints, default="1,2,4,8",
                   help="Comma-separated rollout-step counts of dopsd (default: 1,2,4,8).")
    p.add_argument("--resolutions", type=comma_ints, default=None,
                   help="Comma-separated square resolutions (default: tiny 64, small 256, real 512,768,1024).")
    p.add_argument("--gradient_checkpointing", choices=["both", "off", "on"], default="both",
                   help="Measure with gradient checkpointing off, on, or both (default).")
    p.add_argument("--repeats", type=int, default=5, help="Timed iterations per configuration; the median is reported (default: 5).")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of each measurement (default: 2).")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "BENCHMARKS.md",
                   help="Markdown file whose bench section receives the table (default: BENCHMARKS.md at the repository root).")
    p.add_argument("--one-config", dest="one_config", default=None, help=argparse.SUPPRESS)  # internal: a child's payload
    args = p.parse_args(argv)
    if args.size == "real" and not torch.cuda.is_available():
        p.error("--size real builds 4-9B-parameter transformers in bf16 and needs a CUDA GPU; use --size small on a CPU.")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.one_config is not None:
        payload = json.loads(args.one_config)
        if payload.get("kind") == "resident":
            print(json.dumps(measure_resident(payload["family"], payload["threads"])))
        elif payload.get("kind") == "host_overhead":
            print(json.dumps(measure_host_overhead(payload["threads"])))
        else:
            print(json.dumps(measure(Config(**payload))))
        return

    from make_tiny_models import build_tiny_models

    build_tiny_models(TINY_MODELS)  # once, before the children that load them
    started = time.time()
    command = "python benchmarks/bench_train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    for config in configurations(args):
        row = run_isolated(asdict(config))
        rows.append(row)
        print(table([row])[-1], flush=True)
    families = ["zimage", "klein"] if args.family == "both" else [args.family]
    residents = [run_isolated({"kind": "resident", "family": f, "threads": args.threads}) for f in families]
    verdicts = summarise(rows, args.rollout_steps, residents)
    host = run_isolated({"kind": "host_overhead", "threads": args.threads})
    host_lines = [f"Host work per rollout state, error: {host['error']}"] if isinstance(host, dict) else [
        "Host work per rollout state at the real architectures, outside the forwards (built on the meta device, two rank-64 "
        "adapters; timed on this machine's CPU): the training code switches to the teacher and back once per state, and "
        "each forward needs the transformer's dtype, which diffusers' `.dtype` finds by walking every submodule and "
        "LoraAdaptation asks once per run. Per state that is 2 x `.dtype` (4 for klein, which asks twice per forward) "
        "plus peft's switch without these measures, against the switch alone with them.",
        "",
        *host_overhead_table(host),
    ]
    memory = ("peak = torch.cuda.max_memory_allocated over the timed rounds (weights included), which the target compares; "
              "above start = that peak less what was allocated when they began" if torch.cuda.is_available() else
              "peak = the tensors alive when one more iteration begins (weights, adapters, optimizer states, conditions: "
              "every storage reachable from Python, once) plus above start = the peak of what that iteration allocates "
              "above them, from the CPU allocator's accounting as PyTorch's profiler reports it; the target compares peak "
              "(weights included, as on a GPU)")
    memory += "; peak RSS = the process's peak resident set over the timed rounds (VmHWM), for reference"
    block = "\n".join([
        f"### {args.size} models",
        "",
        f"`{command.strip()}`: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {time.time() - started:.0f} s.",
        (f"Machine: {machine()}; torch threads: {args.threads}; load average (1 min) after each configuration in the last column. "
         f"Times: median of {args.repeats} after {WARMUP_ITERATIONS} warm-up. Memory: {memory}."),
        "",
        *table(rows),
        "",
        "Targets:",
        "",
        *verdicts,
        "",
        *host_lines,
    ])
    write_block(args.output, args.size, block)
    print("\n".join(verdicts + [""] + host_lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
