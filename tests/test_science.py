# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""The science check's world is a model family of the project, D-OPSD on it is the training scripts' own step, and on
the shipped checkpoints D-OPSD keeps the old concepts' few-step quality where SFT does not."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import dopsd_training  # noqa: E402
from benchmarks.science import run_science  # noqa: E402
from benchmarks.science.build_models import TURBO_PATH  # noqa: E402
from benchmarks.science.toy_world import FEW_STEPS, NEW_WORD, ToyFamily, load_model  # noqa: E402
from pipeline_dopsd import rollout_sigmas  # noqa: E402

RETENTION_SEED = 21  # its 8 training samples miss one of the concept's modes


@pytest.fixture(autouse=True)
def one_thread():
    """The figures below are deterministic for a fixed thread count; one thread is also the fastest for these sizes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def turbo():
    return load_model(TURBO_PATH)


def toy_rollout(turbo, teacher_sees_reference: bool, batch: int = 64):
    """One D-OPSD step of a copy of the turbo on "[V]": (per-state losses, the student's gradients)."""
    family = ToyFamily()
    student, teacher = copy.deepcopy(turbo), copy.deepcopy(turbo).requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    student_condition = family.collate(family.encode_student([NEW_WORD] * batch))
    if teacher_sees_reference:
        samples, _ = run_science.concept_samples(RETENTION_SEED)
        references = samples.repeat(batch // len(samples), 1)
        teacher_condition = family.collate(family.encode_teacher([NEW_WORD] * batch, references))
    else:
        teacher_condition = student_condition
    losses = dopsd_training.dopsd_step(
        lambda x, sigma: family.velocity(student, x, sigma, student_condition),
        lambda x, sigma: family.velocity(teacher, x, sigma, teacher_condition),
        family.initial_noise(batch, generator=generator), rollout_sigmas(family.sigmas(FEW_STEPS), FEW_STEPS), "x0",
        backward=lambda loss: (loss / FEW_STEPS).backward(),
    )
    return losses, [p.grad for p in student.parameters()]


def test_text_only_teacher_gives_exactly_zero_loss_and_gradient(turbo):
    losses, grads = toy_rollout(turbo, teacher_sees_reference=False)
    assert [loss.item() for loss in losses] == [0.0] * FEW_STEPS
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


def test_the_reference_is_the_learning_signal(turbo):
    losses, grads = toy_rollout(turbo, teacher_sees_reference=True)
    assert all(loss.item() > 0 for loss in losses)
    assert all(torch.count_nonzero(g) > 0 for g in grads)


def test_text_only_teacher_run_leaves_the_turbo_bit_identical(turbo):
    control = run_science.Method("text-only teacher", 0.99, teacher_sees_reference=False)
    samples, _ = run_science.concept_samples(RETENTION_SEED)
    checkpoint = run_science.finetune(turbo, control, samples, steps=5, seed=0, eval_steps=(5,))[-1]
    assert checkpoint.losses == [0.0] * 5
    for name, weight in checkpoint.model.state_dict().items():
        assert torch.equal(weight, turbo.state_dict()[name]), name


@pytest.fixture(scope="module")
def tiny_zimage(tmp_path_factory):
    from diffusers import ZImagePipeline
    from make_tiny_models import build_tiny_models

    root = build_tiny_models(tmp_path_factory.mktemp("tiny_models"))
    return ZImagePipeline.from_pretrained(root / "z-image")


def test_toy_family_and_tiny_zimage_run_through_the_same_dopsd_step(turbo, tiny_zimage):
    from pipeline_dopsd import ZImageFamily

    # The benchmark holds the training scripts' function object itself, not a copy of it ...
    assert run_science.dopsd_step is dopsd_training.dopsd_step
    # ... and both families' rollouts execute its body: every state's loss is taken by dopsd_training's own code.
    with mock.patch.object(dopsd_training, "distillation_loss", wraps=dopsd_training.distillation_loss) as loss_spy:
        samples, _ = run_science.concept_samples(RETENTION_SEED)
        run_science.finetune(turbo, run_science.DOPSD, samples, steps=1, seed=0, eval_steps=())
        toy_states = [call.args[0].shape for call in loss_spy.call_args_list]

        family = ZImageFamily(tiny_zimage)
        condition = family.collate(family.encode_student(["a photo of [V] dog"]), "cpu")
        noise = family.initial_noise(1, 64, 64, torch.Generator().manual_seed(0))
        sigmas = rollout_sigmas(family.sigmas(8, 64, 64), 4)

        def velocity(x, sigma):
            return family.velocity(tiny_zimage.transformer, x, sigma, condition)

        losses = dopsd_training.dopsd_step(velocity, velocity, noise, sigmas, "x0")
        zimage_states = [call.args[0].shape for call in loss_spy.call_args_list[len(toy_states):]]

    assert toy_states == [torch.Size([run_science.BATCH, 2])] * FEW_STEPS
    assert zimage_states == [noise.shape] * 4
    assert [loss.item() for loss in losses] == [0.0] * 4


def test_dopsd_keeps_old_concepts_where_sft_forgets(turbo):
    samples, covered = run_science.concept_samples(RETENTION_SEED)
    assert len(covered) < 4
    sft, dopsd = (
        run_science.finetune(turbo, method, samples, steps=100, seed=RETENTION_SEED, eval_steps=(100,))[-1].figures
        for method in (run_science.SFT, run_science.DOPSD)
    )
    # Both learn the concept, to about the same degree ...
    assert min(sft["new_sharp"], dopsd["new_sharp"]) > 0.75
    # ... but only D-OPSD keeps the old concepts' 4-step quality, and only it draws the mode its samples miss.
    assert dopsd["old_sharp"] > sft["old_sharp"] + 0.1
    assert (dopsd["new_modes"], sft["new_modes"]) == (4, 3)


def test_the_science_section_is_rewritten_alone(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Training step\nkept\n")
    run_science.write_section(path, f"{run_science.SECTION_START}\nfirst\n{run_science.SECTION_END}\n")
    path.write_text(path.read_text() + "\n## Another tool\nalso kept\n")
    run_science.write_section(path, f"{run_science.SECTION_START}\nsecond\n{run_science.SECTION_END}\n")
    text = path.read_text()
    assert "## Training step\nkept\n" in text and "## Another tool\nalso kept\n" in text
    assert "second" in text and "first" not in text
    assert text.count(run_science.SECTION_START) == 1
