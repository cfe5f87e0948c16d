# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""Fine-tuning the turbo of the concept world on 8 samples of "[V]", by SFT or D-OPSD, through dopsd_training's own
``sft_step``, ``dopsd_step`` (its ``off_policy_x0`` option for the off-policy ablation) and ``ema_update``."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from benchmarks.science.toy_world import FEW_STEPS, NEW_CONCEPT_PHASE, NEW_WORD, NUM_MODES, ToyFamily, VelocityMLP, \
    evaluate, sample_concept
from dopsd_training import dopsd_step, ema_update, sample_sft_sigmas, sft_step
from pipeline_dopsd import rollout_sigmas

NUM_CONCEPT_SAMPLES = 8
BATCH = 256


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "sft" or "dopsd"
    ema_decay: float = 0.99  # D-OPSD's teacher: an EMA of the student (1.0: frozen at the turbo)
    off_policy: bool = False  # D-OPSD's supervision on the noised training samples instead of the student's rollout
    teacher_sees_reference: bool = True  # False: the teacher gets the student's own text-only context (a no-op)

    def __post_init__(self):
        assert self.kind in ("sft", "dopsd"), self.kind


SFT = Method("SFT", "sft")
DOPSD = Method("D-OPSD", "dopsd")


def concept_samples(seed: int) -> tuple[torch.Tensor, list[int]]:
    """The 8 training samples of the new concept for a fine-tuning seed, and which of its modes they cover."""
    points, modes = sample_concept(NEW_CONCEPT_PHASE, NUM_CONCEPT_SAMPLES, torch.Generator().manual_seed(seed))
    return points, sorted(set(modes.tolist()))


def covers_all_modes(seed: int) -> bool:
    return len(concept_samples(seed)[1]) == NUM_MODES


LORA_RANK = 4


def with_lora(turbo: VelocityMLP, seed: int) -> VelocityMLP:
    """A copy of the turbo with a LoRA on every layer (B = 0: the copy starts as the turbo); only the LoRA trains.

    peft draws LoRA A from the global generator, so the draw is seeded here: a run must not depend on what ran before
    it in the same process."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=["input", "hidden.0", "hidden.1", "output"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = inject_adapter_in_model(config, copy.deepcopy(turbo))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model.train()


def finetune(turbo: VelocityMLP, family: ToyFamily, method: Method, samples: torch.Tensor, steps: int, seed: int,
             learning_rate: float, eval_steps=(), keep_models: bool = False):
    """LoRA fine-tuning of a copy of the turbo by `method`.

    Returns (figures per evaluated step, {step: model copy} when `keep_models`, per-step mean losses); step 0 is the
    turbo itself when listed in `eval_steps`."""
    generator = torch.Generator().manual_seed(seed)
    student = with_lora(turbo, seed)
    trainable = [p for p in student.parameters() if p.requires_grad]
    # No weight decay (as the training scripts' default): it would move the weights even under an exactly zero loss.
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    teacher = copy.deepcopy(student).requires_grad_(False) if method.kind == "dopsd" else None
    teacher_trainable = [p for n, p in teacher.named_parameters() if "lora_" in n] if teacher is not None else None
    student_condition = family.collate(family.encode_student([NEW_WORD] * BATCH))
    # The teacher reads all the training samples as one reference set (the "images" of the new concept).
    teacher_condition = (family.collate(family.encode_teacher([NEW_WORD] * BATCH, [samples] * BATCH))
                         if method.teacher_sees_reference else student_condition)
    rollout = rollout_sigmas(family.sigmas(FEW_STEPS), FEW_STEPS)
    x0 = samples.repeat(BATCH // len(samples), 1)

    def student_velocity(x, sigma):
        return family.velocity(student, x, sigma, student_condition)

    def teacher_velocity(x, sigma):
        return family.velocity(teacher, x, sigma, teacher_condition)

    figures, models, losses = {}, {}, []

    def record(step):
        if step in eval_steps:
            snapshot = copy.deepcopy(student).eval()
            figures[step] = evaluate(snapshot, family)
            if keep_models:
                models[step] = snapshot

    record(0)
    for step in range(1, steps + 1):
        noise = family.initial_noise(BATCH, generator=generator)
        if method.kind == "sft":
            sigma = sample_sft_sigmas(family, BATCH, None, None, generator, "cpu")
            step_losses = [sft_step(student_velocity, x0, noise, sigma, backward=torch.Tensor.backward)]
        else:
            step_losses = dopsd_step(student_velocity, teacher_velocity, noise, rollout, "x0",
                                     backward=lambda loss: (loss / FEW_STEPS).backward(),
                                     off_policy_x0=x0 if method.off_policy else None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:
            ema_update(teacher_trainable, trainable, method.ema_decay)
        losses.append(torch.stack(step_losses).mean().item())
        record(step)
    return figures, models, losses
