# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""The science check's mechanics: its world is a model family of the project, its D-OPSD, SFT and EMA are the training
scripts' own functions, its metrics mean what they say, its runs are deterministic; and, on one fixed seed of the
shipped world, the headline comparison of BENCHMARKS.md holds with a margin."""

from __future__ import annotations

import copy
import json
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
from benchmarks.science import finetune as science_finetune  # noqa: E402
from benchmarks.science import run_science  # noqa: E402
from benchmarks.science.finetune import DOPSD, SFT, Method, concept_samples, finetune, with_lora  # noqa: E402
from benchmarks.science.toy_world import (  # noqa: E402
    FEW_STEPS, NAMED_PHASES, NEW_CONCEPT_PHASE, NEW_WORD, PERFECT_PRECISION, SHIPPED_WORLD_SEED, ToyFamily, coverage,
    load_model, precision, sample_concept, world_dir,
)
from pipeline_dopsd import euler_step, rollout_sigmas  # noqa: E402

# The headline seed, chosen after the 12-seed figures of BENCHMARKS.md were known: the seed whose D-OPSD - SFT
# retention difference at step 200 (+0.114) is closest to the 12-seed mean (+0.115) among seeds where both methods
# reach the same new-concept precision (0.789 vs 0.771). Not the best seed (that is +0.297), and not a partial-coverage
# seed: the test is of the typical case, not of SFT over-fitting a sample set that misses a mode.
HEADLINE_SEED = 8


@pytest.fixture(autouse=True)
def one_thread():
    """The figures below are deterministic for a fixed thread count; one thread is also the fastest for these sizes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def family():
    return ToyFamily(SHIPPED_WORLD_SEED)


@pytest.fixture(scope="module")
def turbo():
    return load_model(world_dir(SHIPPED_WORLD_SEED) / "turbo.safetensors")


def one_dopsd_step(turbo, family, teacher_sees_reference: bool, batch: int = 64, record=None):
    """One D-OPSD step of a LoRA'd copy of the turbo on "[V]": (per-state losses, the student's LoRA gradients)."""
    student = with_lora(turbo, seed=0)
    teacher = copy.deepcopy(student).requires_grad_(False)
    student_condition = family.collate(family.encode_student([NEW_WORD] * batch))
    samples, _ = concept_samples(HEADLINE_SEED)
    teacher_condition = (family.collate(family.encode_teacher([NEW_WORD] * batch, [samples] * batch))
                         if teacher_sees_reference else student_condition)

    def student_velocity(x, sigma):
        v = family.velocity(student, x, sigma, student_condition)
        if record is not None:
            record.append(("student", x.clone(), sigma, v.detach().clone()))
        return v

    def teacher_velocity(x, sigma):
        if record is not None:
            record.append(("teacher", x.clone(), sigma, None))
        return family.velocity(teacher, x, sigma, teacher_condition)

    losses = dopsd_training.dopsd_step(
        student_velocity, teacher_velocity, family.initial_noise(batch, generator=torch.Generator().manual_seed(0)),
        rollout_sigmas(family.sigmas(FEW_STEPS), FEW_STEPS), "x0", backward=lambda loss: (loss / FEW_STEPS).backward())
    return losses, [p.grad for p in student.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------------------
# The method's mechanics in this world


def test_same_context_teacher_gives_exactly_zero_loss_and_gradient(turbo, family):
    losses, grads = one_dopsd_step(turbo, family, teacher_sees_reference=False)
    assert [loss.item() for loss in losses] == [0.0] * FEW_STEPS
    assert grads and all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


def test_the_reference_is_the_learning_signal(turbo, family):
    losses, grads = one_dopsd_step(turbo, family, teacher_sees_reference=True)
    assert all(loss.item() > 1e-4 for loss in losses)
    # LoRA A gets no gradient while B = 0; every B does.
    assert all(torch.count_nonzero(g) > 0 for g in grads[1::2])


def test_teacher_and_student_see_the_students_own_rollout(turbo, family):
    calls = []
    one_dopsd_step(turbo, family, teacher_sees_reference=True, record=calls)
    students = [c for c in calls if c[0] == "student"]
    teachers = [c for c in calls if c[0] == "teacher"]
    assert len(students) == len(teachers) == FEW_STEPS
    for (_, x, sigma, v), (_, x_teacher, sigma_teacher, _), (_, x_next, sigma_next, _) in zip(
            students, teachers, students[1:]):
        assert torch.equal(x, x_teacher) and sigma == sigma_teacher
        assert torch.equal(x_next, euler_step(x, sigma, sigma_next, v))  # the student's own Euler step


def test_off_policy_arm_is_dopsd_steps_own_option_on_the_noised_samples(turbo, family):
    samples, _ = concept_samples(HEADLINE_SEED)
    method = Method("off-policy", "dopsd", 0.999, off_policy=True)
    with mock.patch.object(science_finetune, "dopsd_step", wraps=dopsd_training.dopsd_step) as spy, \
            mock.patch.object(dopsd_training, "distillation_loss", wraps=dopsd_training.distillation_loss) as loss_spy:
        finetune(turbo, family, method, samples, steps=1, seed=0, learning_rate=1e-3)
    x0 = spy.call_args.kwargs["off_policy_x0"]
    assert torch.equal(x0, samples.repeat(len(x0) // len(samples), 1))
    noise, sigmas = spy.call_args.args[2], spy.call_args.args[3]
    for call, sigma in zip(loss_spy.call_args_list, sigmas[:-1]):
        assert torch.allclose(call.args[0], (1 - sigma) * x0 + sigma * noise)


def test_every_family_runs_the_training_scripts_own_functions(turbo, family, tiny_models):
    from diffusers import ZImagePipeline

    from pipeline_dopsd import ZImageFamily

    # The science check holds the training scripts' function objects themselves, not copies of them ...
    assert science_finetune.dopsd_step is dopsd_training.dopsd_step
    assert science_finetune.sft_step is dopsd_training.sft_step
    assert science_finetune.ema_update is dopsd_training.ema_update
    # ... and a toy rollout and a Z-Image rollout both execute dopsd_step's body: every state's loss is taken by
    # dopsd_training's own code.
    with mock.patch.object(dopsd_training, "distillation_loss", wraps=dopsd_training.distillation_loss) as loss_spy:
        samples, _ = concept_samples(HEADLINE_SEED)
        finetune(turbo, family, DOPSD, samples, steps=1, seed=0, learning_rate=1e-3)
        toy_states = [call.args[0].shape for call in loss_spy.call_args_list]

        pipe = ZImagePipeline.from_pretrained(tiny_models / "z-image")
        zimage = ZImageFamily(pipe)
        condition = zimage.collate(zimage.encode_student(["a photo of [V] dog"]), "cpu")
        noise = zimage.initial_noise(1, 64, 64, torch.Generator().manual_seed(0))

        def velocity(x, sigma):
            return zimage.velocity(pipe.transformer, x, sigma, condition)

        losses = dopsd_training.dopsd_step(velocity, velocity, noise, rollout_sigmas(zimage.sigmas(8, 64, 64), 4), "x0")
        zimage_states = [call.args[0].shape for call in loss_spy.call_args_list[len(toy_states):]]
    assert toy_states == [torch.Size([science_finetune.BATCH, 2])] * FEW_STEPS
    assert zimage_states == [noise.shape] * 4
    assert [loss.item() for loss in losses] == [0.0] * 4


def test_same_context_teacher_run_leaves_the_turbo_bit_identical(turbo, family):
    control = Method("same-context teacher", "dopsd", 0.99, teacher_sees_reference=False)
    samples, _ = concept_samples(HEADLINE_SEED)
    _, models, losses = finetune(turbo, family, control, samples, steps=5, seed=0, learning_rate=1e-2,
                                 eval_steps=(5,), keep_models=True)
    assert losses == [0.0] * 5
    state = models[5].state_dict()
    for name, weight in turbo.state_dict().items():  # every layer of the turbo carries a LoRA: its base_layer
        module, parameter = name.rsplit(".", 1)
        assert torch.equal(state[f"{module}.base_layer.{parameter}"], weight), name
    assert all(torch.count_nonzero(w) == 0 for n, w in state.items() if "lora_B" in n)


def test_runs_are_deterministic(turbo, family):
    samples, _ = concept_samples(HEADLINE_SEED)
    first, second = (finetune(turbo, family, DOPSD, samples, steps=3, seed=7, learning_rate=3e-3, eval_steps=(3,),
                              keep_models=True) for _ in range(2))
    assert first[0] == second[0] and first[2] == second[2]
    for name, weight in first[1][3].state_dict().items():
        assert torch.equal(weight, second[1][3].state_dict()[name]), name


def test_the_teacher_reads_all_the_training_samples_as_one_set(turbo, family):
    """The teacher's context summarises the whole reference set: every row gets all 8 samples, and the feature is the
    mean of what each point says (a teacher that reads one point would see a noisy phase and miss the concept)."""
    samples, _ = concept_samples(HEADLINE_SEED)
    with mock.patch.object(ToyFamily, "encode_teacher", autospec=True, side_effect=ToyFamily.encode_teacher) as spy:
        finetune(turbo, family, DOPSD, samples, steps=1, seed=0, learning_rate=1e-3)
    (_, prompts, images), _ = spy.call_args
    assert set(prompts) == {NEW_WORD} and len(images) == science_finetune.BATCH
    assert all(torch.equal(torch.as_tensor(i), samples) for i in images)

    angle = 4 * torch.atan2(samples[:, 1], samples[:, 0])
    expected = torch.stack([angle.cos().mean(), angle.sin().mean()])
    context = family.encode_teacher([NEW_WORD], [samples])[0]["context"]
    assert torch.allclose(context[-3:-1], expected, atol=1e-6) and context[-1] == 1
    single = family.encode_teacher([NEW_WORD], [samples[:1]])[0]["context"]
    assert not torch.allclose(single[-3:-1], expected, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# The metrics


def test_precision_tells_the_concept_from_its_neighbours():
    generator = torch.Generator().manual_seed(0)
    real, _ = sample_concept(NEW_CONCEPT_PHASE, 4000, generator)
    assert abs(precision(real, NEW_CONCEPT_PHASE) - PERFECT_PRECISION) < 0.02
    for neighbour in NAMED_PHASES:
        points, _ = sample_concept(neighbour, 4000, generator)
        assert precision(points, NEW_CONCEPT_PHASE) < 0.01


def test_coverage_counts_missing_modes():
    generator = torch.Generator().manual_seed(0)
    points, modes = sample_concept(NEW_CONCEPT_PHASE, 4000, generator)
    assert coverage(points, NEW_CONCEPT_PHASE) > 0.97
    assert abs(coverage(points[modes != 2], NEW_CONCEPT_PHASE) - 0.75) < 0.01


def test_matched_learning_interpolates_the_first_crossing():
    curve = {0: {"new_precision_4": 0.0, "x": 1.0}, 10: {"new_precision_4": 0.6, "x": 0.8},
             20: {"new_precision_4": 0.8, "x": 0.4}, 30: {"new_precision_4": 0.5, "x": 0.0}}
    assert run_science.at_matched_learning(curve, "x") == pytest.approx(0.6)  # halfway from step 10 to 20
    assert run_science.at_matched_learning({0: curve[0], 10: curve[10]}, "x") is None


def test_the_frontier_envelope_is_the_best_retention_at_or_above_a_learning_level():
    curve = {0: {"new_precision_4": 0.0, "old_precision_4": 0.9}, 10: {"new_precision_4": 0.7, "old_precision_4": 0.6},
             20: {"new_precision_4": 0.65, "old_precision_4": 0.8}, 30: {"new_precision_4": 0.75, "old_precision_4": 0.5}}
    assert run_science.best_at_learning(curve, 0.7) == 0.6  # step 20 retains more but has not learnt enough
    assert run_science.best_at_learning(curve, 0.6) == 0.8
    assert run_science.best_at_learning(curve, 0.8) is None


def test_verdicts_follow_the_interval_not_the_mean():
    assert run_science.verdict([0.10, 0.12, 0.11, 0.09], "up", "down") == "up"
    assert run_science.verdict([-0.10, -0.12, -0.11, -0.09], "up", "down") == "down"
    assert run_science.verdict([0.30, -0.20, 0.25, -0.15], "up", "down") == "no significant difference"  # mean > 0
    assert run_science.verdict([0.5], "up", "down").startswith("no significant difference")


# ----------------------------------------------------------------------------------------------------------------------
# The headline, on one fixed seed


def test_headline_at_equal_learning_dopsd_keeps_more_old_concepts_and_all_modes(turbo, family):
    """BENCHMARKS.md's headline on one seed: at step 200 both methods learn the new concept about equally, D-OPSD
    (EMA 0.999) keeps more of the old concepts' 4-step precision and fills all modes. (At the first crossing of
    matched learning, the pre-registered reading, the 12-seed difference is not significant; no test claims it.)"""
    rates = run_science.shipped_selection()
    samples, _ = concept_samples(HEADLINE_SEED)
    steps = run_science.STEPS
    sft, dopsd = (finetune(turbo, family, method, samples, steps, HEADLINE_SEED, rates[kind], eval_steps=(steps,))[0][steps]
                  for method, kind in ((SFT, "sft"), (run_science.ARMS[1][1], "dopsd")))
    assert abs(dopsd["new_precision_4"] - sft["new_precision_4"]) < 0.05, (dopsd, sft)
    assert dopsd["old_precision_4"] > sft["old_precision_4"] + 0.05, (dopsd, sft)  # measured: +0.114
    assert dopsd["new_coverage_4"] > sft["new_coverage_4"] + 0.1, (dopsd, sft)  # measured: 0.95 vs 0.78


def test_a_gate_tie_is_decided_by_the_recorded_figures_not_float32_noise():
    from benchmarks.science.build_models import check_gates

    turbo = torch.tensor([0.812, 0.788, 0.8, 0.812]).mean().item()  # 0.803 as float32 arithmetic leaves it
    assert turbo != 0.803
    figures = json.loads((world_dir(5) / "gates.json").read_text())["figures"]
    assert check_gates({**figures, "turbo_named_4": turbo, "base_named_32": 0.853})["turbo_closes_gap"]
    assert not check_gates({**figures, "turbo_named_4": 0.802, "base_named_32": 0.853})["turbo_closes_gap"]


def test_benchmarks_md_says_what_results_json_and_the_gates_hold():
    """The science section is what run_science writes from the recorded figures: no hand-edited claim, no stale one."""
    section = run_science.section_from_results(run_science.load_results())
    assert section in (ROOT / "BENCHMARKS.md").read_text()


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
