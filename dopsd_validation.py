# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""What a run shows while it trains: grids of base | student | teacher with the same noise per row (an edit's rows
also show its sources first and its target last), the student's sharpness relative to the base, and the x0
predictions of student and teacher along one training rollout."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dopsd_outputs import make_grid, validation_generator
from pipeline_dopsd import euler_step, x0_from_velocity

logger = logging.getLogger("dopsd")


@dataclass
class GridRow:
    """One validation sample of every model, from the same noise; an edit's sources and target ride along."""

    prompt: str
    base: Image.Image
    student: Image.Image
    teacher: Image.Image | None = None
    sources: list[Image.Image] = field(default_factory=list)
    target: Image.Image | None = None

    def images(self, with_base: bool = True) -> list[Image.Image]:
        shown = [self.base, self.student] if with_base else [self.student]
        return [*self.sources, *shown, *([self.teacher] if self.teacher else []), *([self.target] if self.target else [])]


def _base_file(run, row, generator, width: int, height: int) -> Path:
    # An edit's base image depends on its sources as much as on its prompt and noise.
    edit = f"-{row.source_digest[:16]}" if row.source_digest else ""
    return Path(run.args.output_dir) / "samples" / "base" / f"{generator.initial_seed()}-{width}x{height}{edit}.png"


@torch.no_grad()
def sample_grid(run) -> list[GridRow]:
    """One GridRow per validation row and seed, at the deployment step count.

    The base column is generated once, before any training, and kept under samples/base/ so that it stays the
    untouched base model across validations and resumes (a fully fine-tuned run has no other copy of it).
    """
    args, family = run.args, run.family
    rows = []
    family.pipe.vae.to(run.device)
    for index, row in enumerate(run.rows):
        (width, height), prompt = row.image.size, row.captions[0]
        sigmas = family.sigmas(args.num_inference_steps, height, width, run.device)
        student_condition = family.collate([run.conditions.student(prompt, row)], run.device)
        for r in range(args.num_validation_images):
            generator = validation_generator(prompt, r, args.seed)
            base_file = _base_file(run, row, generator, width, height)
            noise = family.initial_noise(1, height, width, generator).to(run.device)
            if base_file.exists():
                base = Image.open(base_file).convert("RGB")
            else:
                with run.adaptation.base():
                    base = family.decode(family.sample(run.transformer, student_condition, noise, sigmas))[0]
                base_file.parent.mkdir(parents=True, exist_ok=True)
                base.save(base_file)
            with run.adaptation.student():
                student = family.decode(family.sample(run.transformer, student_condition, noise, sigmas))[0]
            teacher = None
            if run.validation_teacher:
                teacher_condition = family.collate([run.validation_teacher[index]], run.device)
                teacher = family.decode(run.adaptation.teacher_sample(teacher_condition, noise, sigmas))[0]
            rows.append(GridRow(prompt, base, student, teacher, list(row.sources or []), row.image if row.sources else None))
    family.pipe.vae.to("cpu")
    return rows


@torch.no_grad()
def rollout_strip(run) -> Image.Image | None:
    """Decoded x0 predictions of the student (top) and the teacher (bottom) along one training rollout."""
    from dopsd_training import training_rollout_sigmas

    args, family = run.args, run.family
    if not run.validation_teacher:
        return None
    row = run.rows[0]
    (width, height), prompt = row.image.size, row.captions[0]
    sigmas = training_rollout_sigmas(family, args, height, width, run.device)
    student_condition = family.collate([run.conditions.student(prompt, row)], run.device)
    teacher_condition = family.collate([run.validation_teacher[0]], run.device)
    x = family.initial_noise(1, height, width, validation_generator(prompt, 0, args.seed)).to(run.device)
    student_row, teacher_row = [], []
    family.pipe.vae.to(run.device)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v_teacher = run.adaptation.teacher_velocity(x, sigma, teacher_condition)
        with run.adaptation.student():
            v_student = family.velocity(run.transformer, x, sigma, student_condition)
        student_row.append(family.decode(x0_from_velocity(x, sigma, v_student))[0])
        teacher_row.append(family.decode(x0_from_velocity(x, sigma, v_teacher))[0])
        x = euler_step(x, sigma, sigma_next, v_student)
    family.pipe.vae.to("cpu")
    return make_grid([student_row, teacher_row])


def validate(run, step: int) -> list[tuple[str, Image.Image]]:
    """Grids under samples/ and to the trackers, and the student's sharpness relative to the base (same noise).
    Returns (prompt, student image) pairs for the model card."""
    from dopsd_metrics import few_step_quality_warning, sharpness_ratio

    args, accelerator = run.args, run.accelerator
    rows = sample_grid(run)
    ratio = sharpness_ratio([row.student for row in rows], [row.base for row in rows])
    accelerator.log({"validation/sharpness_ratio": ratio}, step=step)
    with open(Path(args.output_dir) / "validation_log.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "sharpness_ratio": ratio}) + "\n")
    if warning := few_step_quality_warning(ratio, args.quality_warn_ratio):
        logger.warning("step %d: %s", step, warning)
    samples = Path(args.output_dir) / "samples"
    samples.mkdir(exist_ok=True)
    grid = make_grid([row.images() for row in rows])
    grid.save(samples / f"step-{step:06d}.png")
    strip = rollout_strip(run)
    if strip is not None:
        strip.save(samples / f"rollout-step-{step:06d}.png")
    columns = "sources|base|student|teacher|target" if rows[0].sources else "base|student|teacher"
    for tracker in accelerator.trackers:
        pictures = {f"validation {columns}": grid, **({"rollout x0 student/teacher": strip} if strip else {})}
        for name, picture in pictures.items():
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, np.asarray(picture), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({name: wandb.Image(picture)}, step=step)
    return [(row.prompt, row.student) for row in rows[:: args.num_validation_images]]


def preview_teacher(run):
    """--preview_teacher_only: a student | teacher grid for the training images, before any training."""
    rows = sample_grid(run)
    path = Path(run.args.output_dir) / "teacher_preview.png"
    make_grid([row.images(with_base=False) for row in rows]).save(path)
    columns = "sources, student, teacher, target" if rows[0].sources else "student, teacher"
    logger.info("wrote %s (columns: %s; rows: training prompts x seeds)", path, columns)
