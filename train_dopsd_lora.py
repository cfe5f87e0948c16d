#!/usr/bin/env python
# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""D-OPSD LoRA training for step-distilled image models (Z-Image-Turbo, FLUX.2-klein 4B/9B).

    accelerate launch train_dopsd_lora.py --pretrained_model_name_or_path Tongyi-MAI/Z-Image-Turbo \\
        --instance_data_dir ./my_concept --instance_prompt "a photo of [V] dog" --output_dir out

The student and the teacher are two LoRA adapters on one frozen base: "student" is trained, "teacher" holds the
student's exponential moving average in fp32 and never receives gradients. The result,
out/pytorch_lora_weights.safetensors, is the student in diffusers format: `pipe.load_lora_weights("out")`.
"""

from __future__ import annotations

import contextlib

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

import dopsd_flags as flags
from dopsd_args import UserError, build_parser, finalize_args, run_main
from dopsd_engines import Engine
from dopsd_training import ema_update, logger, train
from pipeline_dopsd import weights_dtype

STUDENT, TEACHER = "student", "teacher"


def make_parser():
    parser = build_parser(__doc__.split("\n\n")[0])
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=flags.positive_int, default=64, help="LoRA rank.")
    lora.add_argument("--lora_alpha", type=flags.positive_int, default=128, help="LoRA alpha (scale alpha / rank).")
    lora.add_argument("--lora_dropout", type=flags.open_fraction, default=0.0, help="LoRA dropout.")
    lora.add_argument("--lora_format", choices=["diffusers", "comfyui"], default="diffusers",
                      help="Keys of the final pytorch_lora_weights.safetensors: diffusers (transformer.*) or comfyui "
                           "(diffusion_model.*; BFL names for FLUX.2). diffusers' load_lora_weights reads both.")
    lora.add_argument("--lora_preset", choices=["reference", "all"], default=None,
                      help="Layers to adapt. reference (default): those the paper's LoRAs adapted, attention and "
                           "feed-forward for Z-Image-Turbo, the double-stream attention only for FLUX.2-klein; all: for "
                           "FLUX.2-klein also its double-stream feed-forwards and single-stream blocks (Z-Image-Turbo: "
                           "the same as reference).")
    lora.add_argument("--lora_layers", default=None, type=flags.name_list,
                      help="Comma-separated module-name suffixes to adapt, matched against every Linear of the "
                           "transformer, instead of a --lora_preset.")
    lora.add_argument("--bnb_quantization_config_path", default=None, type=flags.text,
                      help="JSON of a bitsandbytes config (e.g. {\"load_in_4bit\": true, \"bnb_4bit_quant_type\": \"nf4\"}) "
                           "to hold the frozen base transformer in 4 or 8 bits (QLoRA; needs a CUDA GPU).")
    return parser


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    family = finalize_args(args)
    if args.lora_preset is not None and args.lora_layers is not None:
        raise UserError("--lora_preset and --lora_layers both choose the adapted layers: pass one of them.")
    if args.lora_layers is None:
        args.lora_preset = args.lora_preset or "reference"
    if args.bnb_quantization_config_path is not None:
        args.quantization_config = read_quantization_config(args.bnb_quantization_config_path)
    return args, family


def read_quantization_config(path) -> dict:
    """The bitsandbytes config, checked before any model is loaded."""
    import importlib.util
    import json

    try:
        config = json.loads(open(path, encoding="utf-8").read())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"--bnb_quantization_config_path {path}: cannot read a JSON object ({error}).") from None
    if not isinstance(config, dict):
        raise UserError(f"--bnb_quantization_config_path {path} must hold a JSON object of BitsAndBytesConfig fields.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--bnb_quantization_config_path needs bitsandbytes: pip install bitsandbytes.")
    if not torch.cuda.is_available():
        raise UserError("--bnb_quantization_config_path needs a CUDA GPU (bitsandbytes quantizes on the GPU).")
    return config


def resolve_lora_targets(transformer, suffixes: list[str]) -> list[str]:
    """Full names of the Linear layers whose names end with one of the suffixes (so 4B and 9B both match)."""
    linears = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    targets, unmatched = [], []
    for suffix in suffixes:
        found = [n for n in linears if n == suffix or n.endswith("." + suffix)]
        (targets.extend(found) if found else unmatched.append(suffix))
    if unmatched:
        raise UserError(f"--lora_layers {','.join(unmatched)} match no Linear layer of the transformer: check the module names.")
    return sorted(set(targets))


class LoraAdaptation:
    """Two adapters on one base. Switching follows the safe order of diffusers_internals §4.3: the teacher runs first
    under no_grad, and the student is active whenever a forward builds a graph or backward recomputes one."""

    kind = "lora"
    frozen_base = True

    @staticmethod
    def transformer_load_kwargs(args, weight_dtype) -> dict:
        """A quantized frozen base (QLoRA) when asked for; the teacher and the student share it."""
        config = getattr(args, "quantization_config", None)
        if config is None:
            return {}
        from diffusers import BitsAndBytesConfig

        if config.get("load_in_4bit"):
            config = {"bnb_4bit_compute_dtype": weight_dtype, **config}
        return {"quantization_config": BitsAndBytesConfig(**config)}

    @staticmethod
    def check_engine(args, engine):
        if getattr(args, "quantization_config", None) is not None and engine.shards_parameters:
            raise UserError(f"a bitsandbytes-quantized base cannot be sharded by {engine.name}: use data parallel or "
                            "DeepSpeed ZeRO-1/2 with --bnb_quantization_config_path.")

    def __init__(self, args, family, transformer, accelerator, weight_dtype):
        self.args, self.family, self.transformer, self.accelerator = args, family, transformer, accelerator
        if getattr(transformer, "is_quantized", False):
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)
        suffixes = [s.strip() for s in args.lora_layers.split(",")] if args.lora_layers else list(family.lora_presets[args.lora_preset])
        targets = resolve_lora_targets(transformer, suffixes)
        self.config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                 init_lora_weights="gaussian", target_modules=targets)
        transformer.add_adapter(self.config, adapter_name=STUDENT)
        if args.method == "dopsd":  # SFT has no teacher
            transformer.add_adapter(self.config, adapter_name=TEACHER)
        params = dict(transformer.named_parameters())
        # LoRA factors train and average in fp32 whatever the frozen base's dtype (a bf16 EMA rounds updates away).
        for name, param in params.items():
            if "lora_" in name:
                param.data = param.data.float()
        self.student_params = [p for n, p in params.items() if f".{STUDENT}." in n]
        self.teacher_params = [params[n.replace(f".{STUDENT}.", f".{TEACHER}.")] for n in params if f".{STUDENT}." in n] if args.method == "dopsd" else []
        with torch.no_grad():
            for teacher, student in zip(self.teacher_params, self.student_params):
                teacher.copy_(student)
        self.lora_layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        self.engine, self.teacher_shadow = Engine(accelerator), None  # until use_prepared says which engine holds the weights
        self.numel = sum(p.numel() for p in self.student_params)
        self.dtype = weights_dtype(transformer)  # asked once (see use_prepared): the rollout needs it twice per state
        self._activate(STUDENT)
        self._freeze_teacher()
        logger.info("LoRA r=%d alpha=%d on %d layers; %d trainable parameters", args.rank, args.lora_alpha,
                    len(targets), sum(p.numel() for p in self.student_params))

    def _activate(self, adapter: str):
        # Switching happens twice per rollout state. peft's set_adapter walks every module of the transformer and resets
        # requires_grad on every adapter parameter (tens of milliseconds per state on a 6B model, longer than a 512 px
        # forward on a fast GPU); here only the active name of the LoRA layers changes, the attribute that
        # BaseTunerLayer.set_adapter itself sets, and requires_grad stays as _freeze_teacher left it.
        for layer in self.lora_layers:
            layer._active_adapter = [adapter]

    def _freeze_teacher(self):
        """The student trains and the teacher never does, whichever adapter peft last enabled."""
        for p in self.student_params:
            p.requires_grad_(True)
        for p in self.teacher_params:
            p.requires_grad_(False)

    def trainable_parameters(self):
        return self.student_params

    @contextlib.contextmanager
    def student(self):
        self._activate(STUDENT)
        yield

    @contextlib.contextmanager
    def base(self):
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()
            self._activate(STUDENT)
            self._freeze_teacher()

    def student_velocity(self, model, x, sigma, condition):
        return self.family.velocity(model, x, sigma, condition, dtype=self.dtype)

    @torch.no_grad()
    def teacher_velocity(self, x, sigma, condition):
        self._activate(TEACHER)
        try:
            return self.family.velocity(self.transformer, x, sigma, condition, dtype=self.dtype)
        finally:
            self._activate(STUDENT)

    @torch.no_grad()
    def teacher_sample(self, condition, noise, sigmas):
        self._activate(TEACHER if self.teacher_params else STUDENT)
        try:
            return self.family.sample(self.transformer, condition, noise, sigmas)
        finally:
            self._activate(STUDENT)

    def fingerprint(self, role: str) -> torch.Tensor:
        """Of the whole adapter (the teacher's fp32 EMA), gathered one tensor at a time (collective)."""
        from dopsd_training import fingerprint

        return fingerprint(self.engine.full(p, part) for p, part in self._parts(role))

    def expected_numel(self, role: str) -> int:
        return self.numel if role == "student" or self.teacher_params else 0

    def parameter_groups(self) -> dict:
        return {"student": self.student_params, **({"teacher": self.teacher_params} if self.teacher_params else {})}

    def _parts(self, role: str):
        """(parameter, this rank's part of its fp32 value) for one adapter: the student's optimizer masters, the
        teacher's EMA state (its fp32 shadow where the engine cast the module)."""
        if role == "student":
            return [(p, self.engine.master(p)) for p in self.student_params]
        shadow = self.teacher_shadow or [self.engine.local(p) for p in self.teacher_params]
        return list(zip(self.teacher_params, shadow))

    def update_teacher(self):
        """teacher <- d * teacher + (1 - d) * student on each rank's own part, from the student's fp32 masters."""
        engine = self.engine
        state = [part for _, part in self._parts("teacher")]
        ema_update(state, [engine.master(p) for p in self.student_params], self.args.ema_decay)
        if self.teacher_shadow is not None:
            for p, shadow in zip(self.teacher_params, self.teacher_shadow):
                engine.local(p).copy_(shadow)
        engine.refresh(self.teacher_params)

    def use_prepared(self, model, engine):
        self.engine = engine
        self.dtype = weights_dtype(model)  # an engine may have cast the weights (DeepSpeed's bf16 mode does)
        # FSDP2 replaces the parameters by sharded ones: take them again from the module.
        params = dict(self.transformer.named_parameters())
        self.student_params = [p for n, p in params.items() if f".{STUDENT}." in n]
        self.teacher_params = [params[n.replace(f".{STUDENT}.", f".{TEACHER}.")] for n in params if f".{STUDENT}." in n] if self.teacher_params else []
        self._names = {id(p): n for n, p in params.items()}
        # DeepSpeed's bf16 mode casts the whole module, the teacher adapter included: its EMA then accumulates in an
        # fp32 copy of this rank's part (a bf16 EMA rounds most updates of decay 0.9999 away), copied in after each update.
        if any(engine.local(p).dtype != torch.float32 for p in self.teacher_params):
            self.teacher_shadow = [engine.master(p).clone() for p in self.student_params]
        self.register_checkpoint_hooks()

    # -- saving -----------------------------------------------------------------------------------------------------------
    def _adapter_state(self, role: str) -> dict[str, torch.Tensor]:
        """The adapter's whole fp32 weights under peft's keys, on the main process (collective)."""
        parts = {self._names[id(p)]: part for p, part in self._parts(role)}
        adapter = STUDENT if role == "student" else TEACHER
        state = self.engine.full_state_dict(self.transformer, parts, keep=lambda name: name in parts)
        return get_peft_model_state_dict(self.transformer, state_dict=state, adapter_name=adapter) if state else {}

    def _save_adapter(self, directory, role, weight_name):
        state = self._adapter_state(role)
        if self.accelerator.is_main_process:
            type(self.family.pipe).save_lora_weights(
                directory, transformer_lora_layers=state, transformer_lora_adapter_metadata=self.config.to_dict(),
                weight_name=weight_name,
            )

    @torch.no_grad()
    def _load_adapter(self, directory, role, weight_name):
        state = type(self.family.pipe).lora_state_dict(directory, weight_name=weight_name)
        state = state[0] if isinstance(state, tuple) else state
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        adapter = STUDENT if role == "student" else TEACHER
        for p, part in self._parts(role):
            module, _, leaf = self._names[id(p)].rpartition(f".{adapter}.")
            key = f"{module}.{leaf}"
            if key not in state:
                raise UserError(f"checkpoint {directory} does not match this LoRA configuration (no {key}).")
            whole = state.pop(key)
            part.copy_(self.engine.part_of(p, whole.to(part.device, part.dtype)).view_as(part))
            if role == "teacher" and self.teacher_shadow is not None:
                self.engine.local(p).copy_(part)
        if state:
            raise UserError(f"checkpoint {directory} does not match this LoRA configuration (unexpected {next(iter(state))}).")
        self.engine.refresh([p for p, _ in self._parts(role)])

    def register_checkpoint_hooks(self):
        """checkpoint-N holds both adapters in diffusers format (the student loads like a final LoRA, the teacher holds
        its fp32 EMA) plus accelerate's optimizer, scheduler and RNG state. The frozen base is never written under data
        parallel and DeepSpeed; FSDP's own checkpoint writes the whole sharded model."""
        unwrapped = self.accelerator.unwrap_model
        engine_saves_model = self.engine.name != "data parallel"

        def save_hook(models, weights, output_dir):
            self._save_adapter(output_dir, "student", "pytorch_lora_weights.safetensors")
            if self.teacher_params:
                self._save_adapter(output_dir, "teacher", "teacher_lora_weights.safetensors")
            # `models` is accelerate's own list: leave it alone. Under data parallel `weights` holds what accelerate is
            # about to write, the frozen base included: keep that out.
            for i in reversed(range(len(weights))):
                if unwrapped(models[i]) is self.transformer:
                    weights.pop(i)

        def load_hook(models, input_dir):
            for i in reversed(range(len(models))):  # a list of its own, made for the hooks
                if unwrapped(models[i]) is self.transformer:
                    models.pop(i)
            if not engine_saves_model:  # DeepSpeed and FSDP restored the student (and its fp32 masters) themselves
                self._load_adapter(input_dir, "student", "pytorch_lora_weights.safetensors")
            if self.teacher_params:
                self._load_adapter(input_dir, "teacher", "teacher_lora_weights.safetensors")
            self._activate(STUDENT)

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def save_final(self, output_dir):
        if self.args.lora_format == "comfyui":
            state = self._adapter_state("student")
            if self.accelerator.is_main_process:
                state = {f"transformer.{k}": v.contiguous() for k, v in state.items()}
                save_file(self.family.comfyui_lora(state, self.args.lora_alpha / self.args.rank),
                          str(output_dir / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
        else:
            self._save_adapter(output_dir, "student", "pytorch_lora_weights.safetensors")
        logger.info("saved the student LoRA (%s keys) to %s/pytorch_lora_weights.safetensors", self.args.lora_format, output_dir)


def main(argv=None):
    args, family = parse_args(argv)
    train(args, family, LoraAdaptation)


if __name__ == "__main__":
    run_main(main)
