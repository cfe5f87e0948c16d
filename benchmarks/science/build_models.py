# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""The science check's base flow model and its 4-step distilled turbo, and the gates a world must pass.

    python -m benchmarks.science.build_models                      # re-measure the shipped world's gates (seconds)
    python -m benchmarks.science.build_models --rebuild            # retrain the shipped world, verify, save (minutes)
    python -m benchmarks.science.build_models --rebuild --world_seeds 0 1 2 3 4 5 6 7   # all the shipped worlds

The fine-tuning comparison means something only if the world has the properties the method depends on: a real
few-step gap (the base at 4 steps is clearly worse than at 32) that the turbo closes; a teacher context from which the
turbo draws a concept it has no word for, *precisely* and on all its modes; nothing known about "[V]" before; and a
vanilla SFT that measurably turns the turbo back into a model that needs many steps. The gates measure exactly these.
A world seed draws the word vectors and seeds the training; the gates must pass on most world seeds, not one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from benchmarks.science.finetune import SFT, concept_samples, finetune
from benchmarks.science.toy_world import (
    FEW_STEPS, MANY_STEPS, NAMED_PHASES, NEW_CONCEPT_PHASE, NEW_WORD, PERFECT_PRECISION,
    SHIPPED_WORLD_SEED, WORD_DIM, ToyFamily, VelocityMLP, contexts, coverage, evaluate, generate, load_model,
    old_precision, precision, reference_feature, sample_concept, save_model, world_dir,
)
from dopsd_training import sft_step
from pipeline_dopsd import euler_step

BASE_STEPS, BASE_LR = 8000, 1e-3
TURBO_STEPS, TURBO_LR = 4000, 3e-4
BATCH = 512
MAX_REFERENCES = 8  # reference sets of 1 .. 8 points when the base learns in-context drawing
TRAJECTORIES = 32768  # base ODE trajectories the turbo regresses on
SUBSTEPS = 16  # base Euler steps per turbo interval: close enough to the base's ODE solution
# The worlds the world and its gates were designed on, and those built only once both were final: a held-out check of
# "the gates pass for most world seeds".
DESIGN_WORLDS = (0, 1, 2, 3)
HELD_OUT_WORLDS = (4, 5, 6, 7)
# "[V]" text-only precision a world may have. First set at 0.05, which design worlds 1 and 2 missed (0.081, 0.059): an
# unseen word lands between its neighbours now and then. What the gate must guarantee is that "[V]" is far from learned
# (matched learning is 0.7).
PLANNED_UNKNOWN_LIMIT, UNKNOWN_LIMIT = 0.05, 0.15
# The SFT gate: vanilla SFT at a fixed protocol on these fine-tuning seeds (not the comparison's seeds).
GATE_SFT_SEEDS, GATE_SFT_STEPS, GATE_SFT_LR = (901, 902), 200, 3e-3

# name -> (what it measures, pass condition on the measured figures)
GATES = {
    "few_step_gap": ("base precision on named concepts at 32 steps exceeds 4 steps by >= 0.10",
                     lambda m: m["base_named_32"] - m["base_named_4"] >= 0.10),
    "turbo_closes_gap": ("turbo precision on named concepts at 4 steps >= base at 32 steps - 0.05",
                         lambda m: m["turbo_named_4"] >= m["base_named_32"] - 0.05),
    "concept_unknown": (f'turbo on "[V]" text only: precision <= {UNKNOWN_LIMIT} (there is something to learn)',
                        lambda m: m["turbo_new_text_4"] <= UNKNOWN_LIMIT),
    "teacher_precise": (f'turbo on "[V]" + the 8 training samples as references (the D-OPSD teacher): precision >= 0.6 '
                        f'(a perfect sampler: {PERFECT_PRECISION:.3f}), mean over 4 sample sets',
                        lambda m: m["teacher_precision_4"] >= 0.6),
    "teacher_covers": ('the teacher\'s precise samples cover the concept\'s modes: coverage >= 0.9',
                       lambda m: m["teacher_coverage_4"] >= 0.9),
    "sft_loses_few_steps": (f"vanilla SFT (lr {GATE_SFT_LR}, {GATE_SFT_STEPS} steps) widens the old concepts' 32-step "
                            "minus 4-step precision gap by >= 0.05 over the turbo's",
                            lambda m: m["sft_old_gap"] - m["turbo_old_gap"] >= 0.05),
}


def training_batch(family: ToyFamily, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Training points and conditions in thirds: a named word alone; a named word + a reference set of its concept;
    a fresh random word + a reference set of a uniformly random phase.

    The last third teaches "draw what the references show" for any phase and any word, so an unseen word like "[V]"
    plus references draws their concept: the in-context ability the D-OPSD teacher needs. A fixed "generic" word here
    made that ability depend on the draw of the word vectors (issue #19)."""
    text_only = named_with_reference = batch_size // 3
    fresh = batch_size - text_only - named_with_reference
    named = torch.randint(len(NAMED_PHASES), (text_only + named_with_reference,), generator=generator)
    phases = torch.cat([torch.tensor(NAMED_PHASES)[named], torch.rand(fresh, generator=generator) * (math.pi / 2)])
    words = torch.cat([family.words[named], torch.randn(fresh, WORD_DIM, generator=generator)])
    x0, _ = sample_concept(phases, batch_size, generator)
    with_reference = batch_size - text_only
    references, _ = sample_concept(phases[text_only:].repeat_interleave(MAX_REFERENCES), with_reference * MAX_REFERENCES,
                                   generator)
    set_sizes = torch.randint(1, MAX_REFERENCES + 1, (with_reference,), generator=generator)
    features = reference_feature(references.view(with_reference, MAX_REFERENCES, 2), set_sizes)
    context = torch.cat([contexts(words[:text_only]), contexts(words[text_only:], features)])
    return x0, {"context": context}


def train_base(family: ToyFamily, generator: torch.Generator) -> VelocityMLP:
    """Flow matching at uniform sigma, with the same SFT step the fine-tuning baseline uses."""
    model = VelocityMLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=BASE_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, BASE_STEPS, eta_min=BASE_LR / 10)
    for step in range(BASE_STEPS):
        x0, condition = training_batch(family, BATCH, generator)
        noise = family.initial_noise(BATCH, generator=generator)
        sigma = torch.rand(BATCH, generator=generator)
        loss = sft_step(lambda x, s: family.velocity(model, x, s, condition), x0, noise, sigma,
                        backward=torch.Tensor.backward)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 2000 == 0:
            print(f"  base step {step}: loss {loss.item():.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def base_ode_pairs(base, family: ToyFamily, condition: dict, noise: torch.Tensor):
    """States of the base's ODE on the turbo grid and, per state, the velocity that reaches the next grid state in one
    Euler step: the turbo's regression targets."""
    grid = family.sigmas(FEW_STEPS)
    x, states, sigmas, targets = noise, [], [], []
    for sigma, sigma_next in zip(grid[:-1], grid[1:]):
        fine = torch.linspace(sigma.item(), sigma_next.item(), SUBSTEPS + 1)
        x_next = x
        for a, b in zip(fine[:-1], fine[1:]):
            x_next = euler_step(x_next, a, b, family.velocity(base, x_next, a, condition))
        states.append(x)
        sigmas.append(sigma.expand(len(x)))
        targets.append((x_next - x) / (sigma_next - sigma))
        x = x_next
    contexts_per_state = condition["context"].repeat(FEW_STEPS, 1)
    return torch.cat(states), torch.cat(sigmas), contexts_per_state, torch.cat(targets)


def distill_turbo(base: VelocityMLP, family: ToyFamily, generator: torch.Generator) -> VelocityMLP:
    """A 4-step student, started from the base, regressing onto the base's ODE on the uniform 4-step grid."""
    _, condition = training_batch(family, TRAJECTORIES, generator)
    noise = family.initial_noise(TRAJECTORIES, generator=generator)
    states, sigmas, pair_contexts, targets = base_ode_pairs(base, family, condition, noise)
    turbo = VelocityMLP()
    turbo.load_state_dict(base.state_dict())
    optimizer = torch.optim.AdamW(turbo.parameters(), lr=TURBO_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, TURBO_STEPS, eta_min=TURBO_LR / 10)
    for step in range(TURBO_STEPS):
        rows = torch.randint(len(states), (BATCH,), generator=generator)
        loss = torch.nn.functional.mse_loss(turbo(states[rows], sigmas[rows], pair_contexts[rows]), targets[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 1000 == 0:
            print(f"  turbo step {step}: loss {loss.item():.5f}", flush=True)
    return turbo.eval()


def mean_named_precision(model, family, steps) -> float:
    per_concept = old_precision(model, family, steps)
    return sum(per_concept.values()) / len(per_concept)


def measure(base, turbo, family: ToyFamily) -> dict[str, float]:
    """The figures the gates read (means over the named concepts where a word is named)."""
    figures = {
        "base_named_32": mean_named_precision(base, family, MANY_STEPS),
        "base_named_4": mean_named_precision(base, family, FEW_STEPS),
        "turbo_named_4": mean_named_precision(turbo, family, FEW_STEPS),
        "turbo_named_32": mean_named_precision(turbo, family, MANY_STEPS),
        "turbo_new_text_4": precision(generate(turbo, family, NEW_WORD), NEW_CONCEPT_PHASE),
    }
    # The teacher as D-OPSD uses it: "[V]" + the 8 training samples of a fine-tuning seed (4 such sets, averaged).
    teacher = [generate(turbo, family, NEW_WORD, reference_set=concept_samples(seed)[0]) for seed in range(4)]
    figures["teacher_precision_4"] = sum(precision(p, NEW_CONCEPT_PHASE) for p in teacher) / len(teacher)
    figures["teacher_coverage_4"] = sum(coverage(p, NEW_CONCEPT_PHASE) for p in teacher) / len(teacher)
    turbo_figures = evaluate(turbo, family)
    figures["turbo_old_gap"] = turbo_figures["old_gap"]
    sft = [finetune(turbo, family, SFT, concept_samples(seed)[0], GATE_SFT_STEPS, seed, GATE_SFT_LR,
                    eval_steps=(GATE_SFT_STEPS,))[0][GATE_SFT_STEPS] for seed in GATE_SFT_SEEDS]
    for key in ("old_gap", "old_precision_4", "new_precision_4", "new_gap"):
        figures[f"sft_{key}"] = sum(f[key] for f in sft) / len(sft)
    return figures


def check_gates(figures: dict[str, float]) -> dict[str, bool]:
    """Each gate's verdict on the figures as gates.json records them (4 places): the precisions are float32 counts of
    a few hundred samples, so a tie such as 0.803 >= 0.853 - 0.05 must not be decided by float32 noise."""
    recorded = {k: round(v, 4) for k, v in figures.items()}
    return {name: bool(passes(recorded)) for name, (_, passes) in GATES.items()}


def report(world_seed: int, figures: dict[str, float], passed: dict[str, bool]):
    print(f"world seed {world_seed}:")
    for name, value in figures.items():
        print(f"  {name:22s} {value:.3f}")
    for name, (description, _) in GATES.items():
        print(f"  [{'pass' if passed[name] else 'FAIL'}] {name}: {description}")


def build_world(world_seed: int) -> dict:
    """Train base and turbo of a world, save them under checkpoints/world_<seed>/, measure the gates on the saved
    (float16) weights, i.e. on what ships."""
    torch.manual_seed(world_seed)
    generator = torch.Generator().manual_seed(world_seed)
    family = ToyFamily(world_seed)
    start = time.perf_counter()
    base = train_base(family, generator)
    base_seconds = time.perf_counter() - start
    turbo = distill_turbo(base, family, generator)
    turbo_seconds = time.perf_counter() - start - base_seconds
    folder = world_dir(world_seed)
    save_model(base, folder / "base.safetensors")
    save_model(turbo, folder / "turbo.safetensors")
    figures = measure(load_model(folder / "base.safetensors"), load_model(folder / "turbo.safetensors"), family)
    record = {"figures": {k: round(v, 4) for k, v in figures.items()}, "passed": check_gates(figures),
              "train_seconds": {"base": round(base_seconds), "turbo": round(turbo_seconds)}, "torch": torch.__version__}
    (folder / "gates.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def verify(world_seed: int) -> dict:
    """Re-measure the gates of a built world and compare with the figures recorded when it was built."""
    folder = world_dir(world_seed)
    family = ToyFamily(world_seed)
    figures = measure(load_model(folder / "base.safetensors"), load_model(folder / "turbo.safetensors"), family)
    recorded = json.loads((folder / "gates.json").read_text())
    drift = max(abs(figures[k] - recorded["figures"][k]) for k in recorded["figures"])
    if drift > 0.01:
        print(f"warning: world {world_seed}'s gate figures differ from its gates.json by up to {drift:.3f}",
              file=sys.stderr)
    return {**recorded, "figures": figures, "passed": check_gates(figures)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="retrain base and turbo (minutes) instead of loading them")
    parser.add_argument("--world_seeds", type=int, nargs="+", default=[SHIPPED_WORLD_SEED],
                        help=f"worlds to build or verify (the comparison uses world {SHIPPED_WORLD_SEED})")
    args = parser.parse_args()
    # The matmuls here are tiny: on a shared 2-core machine a second thread makes them tens of times slower, not faster.
    torch.set_num_threads(1)
    all_passed = True
    for world_seed in args.world_seeds:
        start = time.perf_counter()
        record = build_world(world_seed) if args.rebuild else verify(world_seed)
        report(world_seed, record["figures"], record["passed"])
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
        all_passed &= all(record["passed"].values())
    sys.exit(0 if all_passed else 1)


if __name__ == "__main__":
    main()
