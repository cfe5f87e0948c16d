# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""Science check: does our D-OPSD teach a few-step model a new concept and keep its few-step quality, where SFT forgets?

    python -m benchmarks.science.run_science [--seeds 11 21 31 41] [--steps 200] [--out BENCHMARKS.md]

The shipped 4-step turbo of the 2-D concept world (build_models.py) is fine-tuned on 8 samples of a new concept "[V]"
by vanilla SFT and by D-OPSD with three EMA decays, plus a control whose teacher sees only the text. Both methods run
through dopsd_training's own ``sft_step``, ``dopsd_step`` and ``ema_update``. The table goes into the science section
of the Markdown file, the samples into a scatter plot; the claims are checked and printed with the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.science.build_models import GATES_PATH, TURBO_PATH
from benchmarks.science.toy_world import (
    EVAL_SAMPLES, FEW_STEPS, MODE_STD, NAMED_WORDS, NEW_CONCEPT_PHASE, NEW_WORD, NUM_MODES, SHARP_RADIUS, ToyFamily,
    VelocityMLP, evaluate, generate, load_model, mode_centres, phase_of, sample_concept,
)
from dopsd_training import dopsd_step, ema_update, sample_sft_sigmas, sft_step
from pipeline_dopsd import rollout_sigmas

NUM_CONCEPT_SAMPLES = 8
BATCH = 256
LEARNING_RATE = 3e-4
EVAL_EVERY = 100
DEFAULT_SEEDS = (11, 21, 31, 41)  # 11, 21 and 31 draw samples that miss a mode; 41 covers all four
DEFAULT_STEPS = 200
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "BENCHMARKS.md"
DEFAULT_PLOT = Path(__file__).parent / "samples.png"
SECTION_START, SECTION_END = "<!-- science:start -->", "<!-- science:end -->"
PLOTTED_OLD_WORDS = ("concept 0", "concept 3", "concept 6")  # three of the eight, spread around the ring


@dataclass(frozen=True)
class Method:
    name: str
    ema_decay: float | None = None  # None: SFT, no teacher
    teacher_sees_reference: bool = True

    @property
    def is_sft(self) -> bool:
        return self.ema_decay is None


SFT = Method("SFT")
DOPSD = Method("D-OPSD, EMA 0.99", 0.99)
METHODS = (
    SFT,
    DOPSD,
    Method("D-OPSD, EMA 0.999", 0.999),
    Method("D-OPSD, frozen teacher", 1.0),
    Method("D-OPSD, text-only teacher", 0.99, teacher_sees_reference=False),
)


@dataclass
class Checkpoint:
    step: int
    figures: dict[str, float]
    model: VelocityMLP
    losses: list[float]  # the mean training loss of every step up to this one


def concept_samples(seed: int) -> tuple[torch.Tensor, list[int]]:
    """The 8 training samples of the new concept for a seed, and which of its modes they cover."""
    points, modes = sample_concept(NEW_CONCEPT_PHASE, NUM_CONCEPT_SAMPLES, torch.Generator().manual_seed(seed))
    return points, sorted(set(modes.tolist()))


def finetune(turbo: VelocityMLP, method: Method, samples: torch.Tensor, steps: int, seed: int,
             eval_steps: tuple[int, ...]) -> list[Checkpoint]:
    """Full fine-tuning of a copy of the turbo by `method`; figures (and a copy of the model) at each of `eval_steps`."""
    family = ToyFamily()
    generator = torch.Generator().manual_seed(seed)
    student = copy.deepcopy(turbo).train()
    # No weight decay (as the training scripts' default): it would move the weights even under an exactly zero loss.
    optimizer = torch.optim.AdamW(student.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    teacher = None if method.is_sft else copy.deepcopy(turbo).requires_grad_(False)
    student_condition = family.collate(family.encode_student([NEW_WORD] * BATCH))

    def student_velocity(x, sigma):
        return family.velocity(student, x, sigma, student_condition)

    checkpoints, losses = [], []
    for step in range(1, steps + 1):
        noise = family.initial_noise(BATCH, generator=generator)
        if method.is_sft:
            x0 = samples.repeat(BATCH // len(samples), 1)
            sigma = sample_sft_sigmas(family, BATCH, None, None, generator, "cpu")
            step_losses = [sft_step(student_velocity, x0, noise, sigma, backward=torch.Tensor.backward)]
        else:
            if method.teacher_sees_reference:
                references = samples[torch.randint(len(samples), (BATCH,), generator=generator)]
                teacher_condition = family.collate(family.encode_teacher([NEW_WORD] * BATCH, references))
            else:
                teacher_condition = student_condition
            sigmas = rollout_sigmas(family.sigmas(FEW_STEPS), FEW_STEPS)
            step_losses = dopsd_step(
                student_velocity, lambda x, sigma: family.velocity(teacher, x, sigma, teacher_condition), noise, sigmas,
                "x0", backward=lambda loss: (loss / FEW_STEPS).backward(),
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:
            ema_update(list(teacher.parameters()), list(student.parameters()), method.ema_decay)
        losses.append(torch.stack(step_losses).mean().item())
        if step in eval_steps:
            snapshot = copy.deepcopy(student).eval()
            checkpoints.append(Checkpoint(step, evaluate(snapshot), snapshot, list(losses)))
    return checkpoints


@dataclass
class SeedResult:
    seed: int
    samples: torch.Tensor
    covered: list[int]
    runs: dict[str, list[Checkpoint]]


def run_seed(turbo: VelocityMLP, seed: int, steps: int) -> SeedResult:
    samples, covered = concept_samples(seed)
    eval_steps = tuple(sorted({*range(EVAL_EVERY, steps + 1, EVAL_EVERY), steps}))
    runs = {}
    for method in METHODS:
        start = time.perf_counter()
        runs[method.name] = finetune(turbo, method, samples, steps, seed, eval_steps)
        last = runs[method.name][-1]
        figures = last.figures
        print(f"seed {seed} {method.name:26s} step {last.step}: new {figures['new_sharp']:.3f} / {figures['new_modes']} "
              f"modes, old {figures['old_sharp']:.3f} ({time.perf_counter() - start:.1f} s)", flush=True)
    return SeedResult(seed, samples, covered, runs)


# ----------------------------------------------------------------------------------------------------------------------
# The claims, checked on the figures


def at_step(results: list[SeedResult], method: Method, step: int) -> list[dict[str, float]]:
    return [next(c.figures for c in r.runs[method.name] if c.step == step) for r in results]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def check_claims(results: list[SeedResult], turbo_figures: dict[str, float], first_step: int,
                 last_step: int) -> list[tuple[bool, str]]:
    """(passed, statement with the measured figures) for each claim of the issue."""
    sft, dopsd = at_step(results, SFT, first_step), at_step(results, DOPSD, first_step)
    claims = []

    new_sft, new_dopsd = [f["new_sharp"] for f in sft], [f["new_sharp"] for f in dopsd]
    claims.append((min(new_sft + new_dopsd) >= 0.75 and abs(mean(new_sft) - mean(new_dopsd)) <= 0.05,
                   f"both learn the concept equally by step {first_step}: new-concept sharpness SFT "
                   f"{min(new_sft):.3f}-{max(new_sft):.3f}, D-OPSD (EMA 0.99) {min(new_dopsd):.3f}-{max(new_dopsd):.3f} "
                   "(criterion: all >= 0.75, means within 0.05; documented: about 0.85-0.9)"))
    old_sft, old_dopsd = [f["old_sharp"] for f in sft], [f["old_sharp"] for f in dopsd]
    claims.append((min(old_dopsd) >= 0.70 and max(old_sft) <= 0.55,
                   f"documented retention figures at step {first_step}: old-concept sharpness D-OPSD "
                   f"{min(old_dopsd):.3f}-{max(old_dopsd):.3f} (documented >= 0.70) vs SFT {min(old_sft):.3f}-"
                   f"{max(old_sft):.3f} (documented <= 0.55)"))
    differences = [d - s for d, s in zip(old_dopsd, old_sft)]
    claims.append((mean(differences) >= 0.05 and sum(d > 0 for d in differences) > len(differences) / 2,
                   f"D-OPSD keeps more of the old concepts than SFT at step {first_step}: old sharpness D-OPSD - SFT per "
                   f"seed {' / '.join(f'{d:+.3f}' for d in differences)}, mean {mean(differences):+.3f} "
                   "(criterion: mean >= +0.05 and ahead on most seeds)"))

    missing = [i for i, r in enumerate(results) if len(r.covered) < NUM_MODES]
    if missing:
        dopsd_modes, sft_modes = [dopsd[i]["new_modes"] for i in missing], [sft[i]["new_modes"] for i in missing]
        claims.append((min(dopsd_modes) == NUM_MODES and max(sft_modes) < NUM_MODES,
                       f"generalisation on the {len(missing)} seeds whose samples miss a mode: D-OPSD produces "
                       f"{dopsd_modes} modes, SFT {sft_modes} (claim: D-OPSD all {NUM_MODES}, SFT fewer)"))

    by_decay = {m.ema_decay: at_step(results, m, last_step) for m in METHODS if m.teacher_sees_reference and not m.is_sft}
    new_by_decay = {d: mean(f["new_sharp"] for f in v) for d, v in by_decay.items()}
    old_by_decay = {d: mean(f["old_sharp"] for f in v) for d, v in by_decay.items()}
    claims.append((new_by_decay[0.99] > new_by_decay[0.999] > new_by_decay[1.0] - 0.02 and
                   old_by_decay[0.99] < old_by_decay[0.999] and old_by_decay[0.99] < old_by_decay[1.0],
                   f"EMA trade-off at step {last_step} (decay 0.99 / 0.999 / frozen): new "
                   + " / ".join(f"{new_by_decay[d]:.3f}" for d in (0.99, 0.999, 1.0)) + ", old "
                   + " / ".join(f"{old_by_decay[d]:.3f}" for d in (0.99, 0.999, 1.0))
                   + " (claim: faster EMA learns more and keeps less)"))

    control = [c for r in results for c in r.runs["D-OPSD, text-only teacher"]]
    exact = all(max(c.losses) == 0.0 and c.figures == turbo_figures for c in control)
    claims.append((exact, "text-only teacher: every loss exactly 0 and figures identical to the turbo's"
                          if exact else "text-only teacher: NOT an exact no-op"))
    return claims


# ----------------------------------------------------------------------------------------------------------------------
# Outputs


def format_range(values: list[float]) -> str:
    return f"{mean(values):.3f} [{min(values):.3f}-{max(values):.3f}]" if len(values) > 1 else f"{values[0]:.3f}"


def markdown_section(results, turbo_figures, claims, command: str, seconds: float, steps: list[int]) -> str:
    gates = json.loads(GATES_PATH.read_text())["figures"]
    seeds = " / ".join(str(r.seed) for r in results)
    lines = [
        SECTION_START,
        "## Science check: D-OPSD vs SFT on a 4-step model (2-D concept world)",
        "",
        f"`{command}` ({seconds:.0f} s on one CPU thread). Written by `benchmarks/science/run_science.py`; the world, "
        "models and gates are in `benchmarks/science/`, designed in the research notes' `toy_world.md` (Iteration 3).",
        "",
        f"A 4-step turbo, distilled from a flow model of rings of {NUM_MODES} modes, is fully fine-tuned on "
        f"{NUM_CONCEPT_SAMPLES} samples of a new concept \"[V]\" (phase {NEW_CONCEPT_PHASE}), batch {BATCH}, AdamW lr "
        f"{LEARNING_RATE}. SFT and D-OPSD run through `dopsd_training.sft_step` / `dopsd_step` / `ema_update`; the "
        "D-OPSD teacher is an EMA weight copy conditioned on \"[V]\" + a training sample as the reference. All figures "
        f"at 4 Euler steps on {EVAL_SAMPLES} fixed-noise samples: *new* = fraction of \"[V]\" samples within "
        f"{SHARP_RADIUS:.2f} (4 std) of a mode of the concept (chance about 0.2), *modes* = modes with at least 10 % of "
        "their share, per seed, *old* = the same sharpness, text only, averaged over the 8 named concepts the turbo "
        "already knew.",
        "",
        "Gates of the shipped models (`benchmarks/science/checkpoints/gates.json`): "
        f"base on named concepts {gates['base_named_32']:.3f} at 32 steps vs {gates['base_named_4']:.3f} at 4; "
        f"turbo {gates['turbo_named_4']:.3f} at 4; generic word + reference of the new phase: base@32 "
        f"{gates['base_in_context_32']:.3f}, turbo@4 {gates['turbo_in_context_4']:.3f}; turbo on \"[V]\": text only "
        f"{gates['turbo_new_text_4']:.3f}, + reference (the teacher) {gates['turbo_new_teacher_4']:.3f}.",
        "",
        f"Mean over seeds {seeds} [min-max]:",
        "",
        "| run | step | new sharp | new modes (per seed) | old sharp |",
        "|---|---|---|---|---|",
        f"| turbo, before fine-tuning | 0 | {turbo_figures['new_sharp']:.3f} | {turbo_figures['new_modes']} | "
        f"{turbo_figures['old_sharp']:.3f} |",
    ]
    for method in METHODS:
        for step in steps:
            figures = at_step(results, method, step)
            new, old = format_range([f["new_sharp"] for f in figures]), format_range([f["old_sharp"] for f in figures])
            modes = " ".join(str(f["new_modes"]) for f in figures)
            lines.append(f"| {method.name} | {step} | {new} | {modes} | {old} |")
    lines += [
        "",
        f"Per seed at step {steps[0]} (new sharp / modes / old sharp):",
        "",
        "| seed | training samples cover modes | SFT | D-OPSD, EMA 0.99 |",
        "|---|---|---|---|",
    ]
    for result in results:
        cells = [" / ".join([f"{f['new_sharp']:.3f}", str(f["new_modes"]), f"{f['old_sharp']:.3f}"])
                 for f in (at_step([result], m, steps[0])[0] for m in (SFT, DOPSD))]
        lines.append(f"| {result.seed} | {', '.join(map(str, result.covered))} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        f"Old-concept sharpness per named concept at step {steps[0]}, mean over seeds (the damage is uneven, which is "
        "why *old* averages all eight):",
        "",
        "| run | " + " | ".join(str(k) for k in range(len(NAMED_WORDS))) + " |",
        "|---|" + "---|" * len(NAMED_WORDS),
        "| turbo, before | " + " | ".join(f"{turbo_figures[w]:.2f}" for w in NAMED_WORDS) + " |",
    ]
    for method in METHODS[:-1]:
        figures = at_step(results, method, steps[0])
        lines.append(f"| {method.name} | " + " | ".join(f"{mean(f[w] for f in figures):.2f}" for w in NAMED_WORDS) + " |")
    lines += ["", "Claims of the issue, checked on these figures:", ""]
    lines += [f"- **{'pass' if passed else 'FAIL'}**: {statement}" for passed, statement in claims]
    lines += [
        "",
        "Why the documented retention figures are not reached (a separate investigation, same seeds, 100 steps): the "
        "protocol is not the cause. One reference per row, one per batch or a fixed set; x0- vs v-space loss; an "
        "8-point rollout grid; AdamW betas (0.9, 0.99), eps 1e-6 or weight decay 0.01 each move D-OPSD's 8-concept "
        "*old* by at most 0.04 (0.62-0.68), never to 0.70. D-OPSD's damage is nearly the same on every seed (concepts "
        "0 / 1 at about 0.30 / 0.49), so it comes from the world (word vectors and checkpoints), not the run. The shipped "
        "checkpoints are not the documented ones: their teacher gate is 0.615 where the notes report 0.658, which is why "
        "D-OPSD learns the concept less (0.79-0.84 vs 0.85-0.88); a rebuild with training seed 1 (teacher 0.650) gives "
        "D-OPSD new 0.88-0.91 and SFT old 0.34-0.55, as documented, but D-OPSD old still 0.61-0.63 (seed 2: teacher 0.444, D-OPSD new 0.68-0.70, old 0.75). The notes average "
        "three named concepts without naming them: for 18 of the 56 triples D-OPSD here is >= 0.70 on every seed, but "
        "no triple also keeps SFT <= 0.55 on seed 41, so no choice of three reproduces both documented ranges.",
    ]
    lines += ["", "Samples: `benchmarks/science/samples.png`.", SECTION_END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str):
    """Replace the science section of `path` (or append it), leaving every other section as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def plot_samples(result: SeedResult, turbo: VelocityMLP, step: int, path: Path):
    """Columns turbo / SFT / D-OPSD; top row the new concept (training samples as crosses), bottom row the old ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("turbo, before", turbo)] + [
        (f"{m.name}, step {step}", next(c.model for c in result.runs[m.name] if c.step == step)) for m in (SFT, DOPSD)
    ]
    concepts = [[NEW_WORD], list(PLOTTED_OLD_WORDS)]
    colours = dict(zip((NEW_WORD, *PLOTTED_OLD_WORDS), ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    figure, axes = plt.subplots(2, 3, figsize=(12, 8.4), constrained_layout=True)
    for col, (title, model) in enumerate(columns):
        for row, words in enumerate(concepts):
            ax = axes[row, col]
            for word in words:
                points = generate(model, word, num_samples=600)
                ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.4, color=colours[word], label=word)
                for centre in mode_centres(phase_of(word)):
                    ax.add_patch(plt.Circle(centre.tolist(), SHARP_RADIUS, fill=False, color=colours[word], lw=1))
            if row == 0:
                ax.scatter(result.samples[:, 0], result.samples[:, 1], marker="x", s=60, color="black",
                           label="training samples")
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_aspect("equal")
            subject = 'new concept "[V]"' if row == 0 else "three old concepts (text only)"
            ax.set_title(f"{title}\n{subject}", fontsize=10)
            if col == 0:
                legend = ax.legend(loc="lower left", fontsize=8)
                for handle in legend.legend_handles:
                    handle.set_sizes([30])
                    handle.set_alpha(1)
    figure.suptitle(f"4-step samples, seed {result.seed} (training samples cover modes {result.covered}); circles: "
                    f"{SHARP_RADIUS / MODE_STD:.0f} std around each true mode", fontsize=11)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help="training seeds (each draws its own 8 concept samples); at least 3 for the table")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (figures every {EVAL_EVERY})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file whose science section is rewritten")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="scatter plot of the samples of the first seed")
    args = parser.parse_args()
    # The matmuls here are tiny: on a shared 2-core machine a second thread makes them tens of times slower, not faster.
    torch.set_num_threads(1)

    start = time.perf_counter()
    turbo = load_model(TURBO_PATH)
    turbo_figures = evaluate(turbo)
    results = [run_seed(turbo, seed, args.steps) for seed in args.seeds]
    steps = [c.step for c in results[0].runs[SFT.name]]
    claims = check_claims(results, turbo_figures, steps[0], steps[-1])
    seconds = time.perf_counter() - start

    command = "python -m benchmarks.science.run_science" + (
        "" if args.seeds == list(DEFAULT_SEEDS) else " --seeds " + " ".join(map(str, args.seeds))
    ) + ("" if args.steps == DEFAULT_STEPS else f" --steps {args.steps}")
    write_section(args.out, markdown_section(results, turbo_figures, claims, command, seconds, steps))
    plot_samples(results[0], turbo, steps[0], args.plot)
    for passed, statement in claims:
        print(f"[{'pass' if passed else 'FAIL'}] {statement}")
    print(f"wrote {args.out} and {args.plot} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
