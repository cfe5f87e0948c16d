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
from pathlib import Path

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

STUDENT, TEACHER, TRAINING_ADAPTER = "student", "teacher", "training_adapter"
STUDENT_STATE = "student_lora_weights.safetensors"  # a checkpoint's exact student (data parallel resumes from it)


def fold_lora_scale(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """lora_B · scale, so that the file's factors alone give the trained delta (B·A·alpha/rank) at scale 1."""
    return {k: v * scale if ".lora_B." in k else v for k, v in state.items()}


def make_parser():
    parser = build_parser(__doc__.split("\n\n")[0])
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=flags.positive_int, default=64, help="LoRA rank.")
    lora.add_argument("--lora_alpha", type=flags.positive_int, default=128, help="LoRA alpha (scale alpha / rank).")
    lora.add_argument("--lora_dropout", type=flags.open_fraction, default=0.0, help="LoRA dropout.")
    lora.add_argument("--lora_format", choices=["diffusers", "comfyui"], default="diffusers",
                      help="Keys of the final pytorch_lora_weights.safetensors: diffusers (transformer.*) or comfyui "
                           "(diffusion_model.*; BFL names for FLUX.2, for ComfyUI before 0.9.2). diffusers' "
                           "load_lora_weights reads both, and both load at the trained strength in diffusers and ComfyUI "
                           "(alpha / rank is folded into lora_B).")
    lora.add_argument("--lora_preset", choices=["reference", "all"], default=None,
                      help="Layers to adapt. reference (default): those the paper's LoRAs adapted, attention and "
                           "feed-forward for Z-Image-Turbo, the double-stream attention only for FLUX.2-klein; all: for "
                           "FLUX.2-klein also its double-stream feed-forwards and single-stream blocks (Z-Image-Turbo: "
                           "the same as reference).")
    lora.add_argument("--lora_layers", default=None, type=flags.name_list,
                      help="Comma-separated module-name suffixes to adapt, matched against every Linear of the "
                           "transformer, instead of a --lora_preset.")
    lora.add_argument("--training_adapter", default=None, type=flags.text, metavar="PATH_OR_HUB_ID",
                      help="With --method sft: a diffusers-format LoRA (a .safetensors file, a folder holding one, a Hub "
                           "id, or a Hub id followed by the file's path in the repo) kept frozen and active in every "
                           "training forward and backward, never saved into the output and never used at inference or in "
                           "validation (e.g. a de-distillation 'training adapter' that slows the loss of few-step quality).")
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
    if args.training_adapter is not None:
        args.training_adapter_source = resolve_training_adapter(args.training_adapter, args.method)
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


def resolve_training_adapter(spec: str, method: str) -> tuple[str, str | None]:
    """(location, weight_name) for --training_adapter, checked before any model is loaded where it is a local path."""
    import os

    from safetensors import safe_open

    if method != "sft":
        # D-OPSD rolls out the student as deployed and distils it from its own EMA; an adapter active in training only
        # would make the rollouts and both predictions those of another model.
        raise UserError("--training_adapter is for the --method sft baseline: pass --method sft, or drop the flag for D-OPSD.")
    path = Path(spec).expanduser()
    hint = "a .safetensors LoRA file, a folder holding one, or a Hub id such as owner/name or owner/name/file.safetensors"
    if path.is_dir():
        files = sorted(f.name for f in path.iterdir() if f.suffix == ".safetensors")
        if not files:
            raise UserError(f"--training_adapter {spec}: the folder holds no .safetensors file; give {hint}.")
        name = "pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in files else files[0]
        if len(files) > 1 and name != "pytorch_lora_weights.safetensors":
            raise UserError(f"--training_adapter {spec}: the folder holds several .safetensors files ({', '.join(files)}): "
                            "name the file.")
        path = path / name
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
        except Exception as error:  # safetensors raises its own error types, and OSError for unreadable files
            raise UserError(f"--training_adapter {spec}: not a readable safetensors file ({error}).") from None
        if not any("lora" in k for k in keys):
            raise UserError(f"--training_adapter {spec}: the file holds no LoRA weights (no lora_* keys).")
        return str(path.parent), path.name
    parts = spec.split("/")
    looks_like_hub = not os.path.isabs(spec) and not spec.startswith(".") and len(parts) >= 2 and all(parts)
    if not looks_like_hub or (len(parts) > 2 and not spec.endswith(".safetensors")):
        raise UserError(f"--training_adapter {spec}: no such file or folder; give {hint}.")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


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
        self.training_adapter_params = self._load_training_adapter() if getattr(args, "training_adapter", None) else []
        self.lora_layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        self._training = False  # inside training(): the student plus the training adapter
        self.engine, self.teacher_shadow = Engine(accelerator), None  # until use_prepared says which engine holds the weights
        self.numel = sum(p.numel() for p in self.student_params)
        self.scale = args.lora_alpha / args.rank
        self.dtype = weights_dtype(transformer)  # asked once (see use_prepared): the rollout needs it twice per state
        self._activate(STUDENT)
        self._freeze_teacher()
        logger.info("LoRA r=%d alpha=%d on %d layers; %d trainable parameters", args.rank, args.lora_alpha,
                    len(targets), sum(p.numel() for p in self.student_params))

    @torch.no_grad()
    def _load_training_adapter(self) -> list[torch.nn.Parameter]:
        """--training_adapter as a third, frozen adapter on the base, through the pipeline's own LoRA loader (so any
        file diffusers' load_lora_weights reads for this family loads here, converted to diffusers names)."""
        location, weight_name = self.args.training_adapter_source
        try:
            state, metadata = type(self.family.pipe).lora_state_dict(location, weight_name=weight_name,
                                                                    return_lora_metadata=True)
            self.transformer.load_lora_adapter(state, prefix="transformer", adapter_name=TRAINING_ADAPTER, metadata=metadata)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"--training_adapter {self.args.training_adapter}: cannot load it as a diffusers LoRA of "
                            f"this {self.family.display_name} transformer ({first}).") from None
        params = [p for n, p in self.transformer.named_parameters() if f".{TRAINING_ADAPTER}." in n]
        if not params:
            raise UserError(f"--training_adapter {self.args.training_adapter}: none of its modules exist in this "
                            f"{self.family.display_name} transformer: is it a LoRA for another model?")
        logger.info("training adapter %s: %d frozen parameters, active only in training forwards", self.args.training_adapter,
                    sum(p.numel() for p in params))
        return params

    def _activate(self, adapter: str):
        # Switching happens twice per rollout state. peft's set_adapter walks every module of the transformer and resets
        # requires_grad on every adapter parameter (tens of milliseconds per state on a 6B model, longer than a 512 px
        # forward on a fast GPU); here only the active name of the LoRA layers changes, the attribute that
        # BaseTunerLayer.set_adapter itself sets, and requires_grad stays as _freeze_teacher left it.
        # In training(), the training adapter runs with the student (peft's LoRA layers sum every active adapter they
        # hold and skip the names they do not); never with the teacher, and never outside training.
        active = [adapter, TRAINING_ADAPTER] if self._training and adapter == STUDENT and self.training_adapter_params else [adapter]
        for layer in self.lora_layers:
            layer._active_adapter = active

    def _freeze_teacher(self):
        """The student trains and the teacher and the training adapter never do, whichever adapter peft last enabled
        (its loader leaves a new adapter trainable)."""
        for p in self.student_params:
            p.requires_grad_(True)
        for p in self.teacher_params + self.training_adapter_params:
            p.requires_grad_(False)

    def trainable_parameters(self):
        return self.student_params

    @contextlib.contextmanager
    def student(self):
        """The student as deployed (validation, inference): its own adapter only."""
        self._activate(STUDENT)
        yield

    @contextlib.contextmanager
    def training(self):
        """The student's training forwards and backwards (gradient checkpointing recomputes in backward with the
        active adapters): the student plus --training_adapter when there is one."""
        self._training = True
        self._activate(STUDENT)
        try:
            yield
        finally:
            self._training = False
            self._activate(STUDENT)

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
        self.training_adapter_params = [p for n, p in params.items() if f".{TRAINING_ADAPTER}." in n]
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
        """The adapter as the trainer holds it: raw factors, the real alpha in the metadata (exact for resuming)."""
        state = self._adapter_state(role)
        if self.accelerator.is_main_process:
            self._write_diffusers(directory, weight_name, state, self.config.to_dict())

    def _save_student_for_users(self, directory, weight_name="pytorch_lora_weights.safetensors"):
        """The student as a file that loads at its trained strength everywhere: alpha / rank folded into lora_B and
        alpha = rank recorded. diffusers scales by the metadata's alpha / rank (now 1); ComfyUI reads alpha only from
        `<module>.alpha` keys, ignores the metadata and applies 1 when there is none; so both apply B·A exactly once.
        (`.alpha` keys would not do: diffusers 0.42 refuses a `transformer.*` file holding them, for both families:
        Z-Image's loader converts it as a non-diffusers file and finds no module, FLUX.2's calls it an invalid adapter.)"""
        state = self._adapter_state("student")
        if self.accelerator.is_main_process:
            metadata = {**self.config.to_dict(), "lora_alpha": self.config.r}
            self._write_diffusers(directory, weight_name, fold_lora_scale(state, self.scale), metadata)

    def _write_diffusers(self, directory, weight_name, state, metadata):
        type(self.family.pipe).save_lora_weights(
            directory, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata, weight_name=weight_name,
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
            # pytorch_lora_weights.safetensors is for people (any checkpoint loads like the final LoRA, in diffusers and
            # ComfyUI); folding alpha / rank into it is not exactly invertible, so where this hook restores the student
            # (data parallel) its exact fp32 factors go beside it.
            self._save_student_for_users(output_dir)
            if not engine_saves_model:
                self._save_adapter(output_dir, "student", STUDENT_STATE)
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
                # Checkpoints written before the student's exact file existed held it raw in pytorch_lora_weights.
                exact = STUDENT_STATE if (Path(input_dir) / STUDENT_STATE).exists() else "pytorch_lora_weights.safetensors"
                self._load_adapter(input_dir, "student", exact)
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
                save_file(self.family.comfyui_lora(state, self.scale),
                          str(output_dir / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
        else:
            self._save_student_for_users(output_dir)
        logger.info("saved the student LoRA (%s keys) to %s/pytorch_lora_weights.safetensors", self.args.lora_format, output_dir)


def main(argv=None):
    args, family = parse_args(argv)
    train(args, family, LoraAdaptation)


if __name__ == "__main__":
    run_main(main)
