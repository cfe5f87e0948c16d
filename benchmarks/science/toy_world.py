# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""A 2-D concept world in which D-OPSD's claim can be measured on a CPU (the research notes' toy_world.md, Iteration 3,
rebuilt for issue #19).

A *concept* is a ring of four tight Gaussian modes of radius RING_RADIUS at angles phase + j * pi/2; the concept is its
phase. Four named concepts have their own word vectors and "[V]" is one more word, never seen before fine-tuning. A
condition is [word vector, reference feature, reference flag]: the student sees the word alone (text only); the
teacher also sees a *set* of reference samples of the concept, which a fixed "encoder" turns into one feature the way a
VLM would describe images: it keeps the concept's phase, averages out the samples' noise, and drops which mode each
sample came from.

Why these choices (each one fixes a failure of the previous world, issue #19):
- Modes are tight (MODE_STD 0.08) and neighbouring named concepts sit about 5 std away from the new one, so a sample
  counts as *precise* (within 2 std of one of the concept's own modes) only if it is the concept, not a neighbour.
- The base learns in-context drawing with a fresh random word vector per reference example, so any unseen word plus a
  reference draws the reference's concept, whatever the draw of the word vectors (the world seed).
- The teacher reads a set of references, so its phase estimate is not one noisy point: it draws the concept precisely.

The world is a model family of the project (``ToyFamily``), so D-OPSD and SFT run through the very functions of
dopsd_training.py that the training scripts call; only the network is tiny.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline_dopsd import ModelFamily

RING_RADIUS = 2.0
MODE_STD = 0.08
NUM_MODES = 4
# A sample is *precise* when it lies within 2 std of one of its concept's own modes: a perfect sampler scores
# 1 - exp(-2) = 0.865, and samples of the new concept's neighbours (about 5 std away) almost never count.
PRECISE_RADIUS = 2 * MODE_STD
PERFECT_PRECISION = 1 - math.exp(-(PRECISE_RADIUS / MODE_STD) ** 2 / 2)
# A mode counts as drawn when it receives at least this fraction of its fair share of the precise samples.
MODE_SHARE = 0.1

NAMED_PHASES = tuple(k * (math.pi / 2) / 4 for k in range(4))
NEW_CONCEPT_PHASE = 3 * math.pi / 16  # midway between named concepts 1 and 2: never told about
NAMED_WORDS = tuple(f"concept {k}" for k in range(len(NAMED_PHASES)))
NEW_WORD = "[V]"
WORDS = NAMED_WORDS + (NEW_WORD,)

WORD_DIM = 16
CONTEXT_DIM = WORD_DIM + 2 + 1  # word, reference feature (mean of cos 4 phi, sin 4 phi), reference flag
SIGMA_FREQUENCIES = 2.0 ** torch.arange(8)  # sin/cos features of sigma at 1 .. 128 rad per unit of sigma
WIDTH = 192

CHECKPOINTS = Path(__file__).parent / "checkpoints"
SHIPPED_WORLD_SEED = 0
FEW_STEPS = 4
MANY_STEPS = 32
EVAL_SEED = 1234
NEW_EVAL_SAMPLES = 1000  # samples of the new concept per evaluation
OLD_EVAL_SAMPLES = 250  # samples of each named concept per evaluation


def word_vectors(world_seed: int) -> torch.Tensor:
    """The world's words, one row per entry of WORDS: a draw of the world seed (nothing else about the world is)."""
    return torch.randn(len(WORDS), WORD_DIM, generator=torch.Generator().manual_seed(world_seed))


def phase_of(word: str) -> float:
    return NEW_CONCEPT_PHASE if word == NEW_WORD else NAMED_PHASES[NAMED_WORDS.index(word)]


# ----------------------------------------------------------------------------------------------------------------------
# Concepts and the reference "encoder"


def mode_centres(phase: float | torch.Tensor) -> torch.Tensor:
    """The NUM_MODES mode centres of a concept, shape (NUM_MODES, 2); for a tensor of phases (B, NUM_MODES, 2)."""
    angles = torch.as_tensor(phase, dtype=torch.float32)[..., None] + torch.arange(NUM_MODES) * (2 * math.pi / NUM_MODES)
    return RING_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=-1)


def sample_concept(phase: float | torch.Tensor, num_samples: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of a concept (or of one concept per row, for a tensor of phases) and the mode each came from."""
    centres = mode_centres(phase).expand(num_samples, NUM_MODES, 2)
    modes = torch.randint(NUM_MODES, (num_samples,), generator=generator)
    points = centres[torch.arange(num_samples), modes] + MODE_STD * torch.randn(num_samples, 2, generator=generator)
    return points, modes


def reference_feature(reference_sets: torch.Tensor, set_sizes: torch.Tensor | None = None) -> torch.Tensor:
    """What the teacher's encoder reports about a set of reference points (B, M, 2): the mean of (cos 4 phi, sin 4 phi).

    4 * angle folds the four modes onto one direction, so the feature is the concept's phase whatever modes the samples
    came from; averaging over the set shrinks the samples' noise. `set_sizes` (B,) uses only the first n points of a row.
    """
    angle = 4 * torch.atan2(reference_sets[..., 1], reference_sets[..., 0])
    features = torch.stack([angle.cos(), angle.sin()], dim=-1)
    if set_sizes is None:
        return features.mean(dim=1)
    used = (torch.arange(reference_sets.shape[1]) < set_sizes[:, None]).float()[..., None]
    return (features * used).sum(dim=1) / set_sizes[:, None]


def contexts(words: torch.Tensor, reference_features: torch.Tensor | None = None) -> torch.Tensor:
    """[word vector, reference feature, reference flag] per row; without references the last three are zero."""
    if reference_features is None:
        return torch.cat([words, torch.zeros(len(words), 3)], dim=1)
    return torch.cat([words, reference_features, torch.ones(len(words), 1)], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# The network and the family


class VelocityMLP(torch.nn.Module):
    """v(x, sigma, context) in the flow convention: [x, sin/cos(sigma), context] -> WIDTH -> 2 residual layers -> 2."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.input = torch.nn.Linear(2 + 2 * len(SIGMA_FREQUENCIES) + CONTEXT_DIM, width)
        self.hidden = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(2)])
        self.output = torch.nn.Linear(width, 2)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        phases = sigma[:, None] * SIGMA_FREQUENCIES
        h = F.silu(self.input(torch.cat([x, phases.sin(), phases.cos(), context], dim=1)))
        for layer in self.hidden:
            h = h + F.silu(layer(h))
        return self.output(h)


def save_model(model: VelocityMLP, path: Path):
    """float16 weights: a model is about 0.2 MB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_model(path: Path) -> VelocityMLP:
    model = VelocityMLP()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def world_dir(world_seed: int) -> Path:
    return CHECKPOINTS / f"world_{world_seed}"


class ToyFamily(ModelFamily):
    """The concept world as a model family: states are points (B, 2), conditions are {"context": (CONTEXT_DIM,)}.

    Prompts are words of WORDS; the teacher's "images" are reference sets, one (M, 2) tensor of points per prompt.
    There is no pipeline behind it, and a point has no size: ``height`` and ``width`` are accepted for the family
    interface and ignored.
    """

    pipeline_class_name = "ToyConceptWorld"
    display_name = "2-D concept world"
    native_steps = FEW_STEPS
    default_learning_rate = 1e-3
    tags = ("toy",)

    def __init__(self, world_seed: int = SHIPPED_WORLD_SEED):
        super().__init__(pipe=None)
        self.world_seed = world_seed
        self.words = word_vectors(world_seed)

    def word_rows(self, prompts) -> torch.Tensor:
        return self.words[torch.tensor([WORDS.index(p) for p in prompts])]

    def encode_student(self, prompts):
        return [{"context": c} for c in contexts(self.word_rows(prompts))]

    def encode_teacher(self, prompts, images):
        features = reference_feature(torch.stack([torch.as_tensor(i) for i in images]))
        return [{"context": c} for c in contexts(self.word_rows(prompts), features)]

    def collate(self, conditions, device=None):
        return {"context": torch.stack([c["context"] for c in conditions]).to(device)}

    def initial_noise(self, batch_size, height=None, width=None, generator=None, device=None):
        return torch.randn(batch_size, 2, generator=generator).to(device)

    def sigmas(self, num_inference_steps, height=None, width=None, device=None):
        """The uniform grid the turbo was distilled on: 1, 0.75, 0.5, 0.25, 0 for 4 steps."""
        return torch.linspace(1.0, 0.0, num_inference_steps + 1, device=device)

    def velocity(self, transformer, x, sigma, condition, attention_kwargs=None, dtype=None):
        return transformer(x, torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]), condition["context"])


# ----------------------------------------------------------------------------------------------------------------------
# Sampling and metrics


@torch.no_grad()
def generate(model, family: ToyFamily, word: str, steps: int = FEW_STEPS, num_samples: int = NEW_EVAL_SAMPLES,
             seed: int = EVAL_SEED, reference_set: torch.Tensor | None = None) -> torch.Tensor:
    """Euler samples of `word`, text only or with one reference set (M, 2) for every sample; fixed noise per seed."""
    noise = family.initial_noise(num_samples, generator=torch.Generator().manual_seed(seed))
    if reference_set is None:
        conditions = family.encode_student([word] * num_samples)
    else:
        conditions = family.encode_teacher([word] * num_samples, [reference_set] * num_samples)
    return family.sample(model, family.collate(conditions), noise, family.sigmas(steps))


def nearest_mode(points: torch.Tensor, phase: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and distance to the nearest mode of the concept, per point."""
    distance, mode = torch.cdist(points, mode_centres(phase)).min(dim=1)
    return mode, distance


def precision(points: torch.Tensor, phase: float) -> float:
    """Fraction of the points within PRECISE_RADIUS (2 std) of one of the concept's own modes."""
    _, distance = nearest_mode(points, phase)
    return (distance < PRECISE_RADIUS).float().mean().item()


def mode_shares(points: torch.Tensor, phase: float) -> torch.Tensor:
    """Share of the precise points at each of the concept's modes (zeros when no point is precise)."""
    mode, distance = nearest_mode(points, phase)
    counts = torch.bincount(mode[distance < PRECISE_RADIUS], minlength=NUM_MODES).float()
    return counts / counts.sum().clamp(min=1)


def coverage(points: torch.Tensor, phase: float) -> float:
    """How evenly the precise points cover the concept's modes: the sum over modes of min(share, 1/4), so 1 for an
    even spread, 0.75 when one mode is missing, 0 when no point is precise."""
    return mode_shares(points, phase).clamp(max=1 / NUM_MODES).sum().item()


def modes_drawn(points: torch.Tensor, phase: float) -> int:
    """How many of the concept's modes receive at least MODE_SHARE of their fair share of the precise points."""
    return int((mode_shares(points, phase) >= MODE_SHARE / NUM_MODES).sum())


def old_precision(model, family: ToyFamily, steps: int) -> dict[str, float]:
    """Precision of every named concept, text only."""
    return {w: precision(generate(model, family, w, steps, OLD_EVAL_SAMPLES), phase_of(w)) for w in NAMED_WORDS}


def evaluate(model, family: ToyFamily) -> dict[str, float]:
    """The figures of the science check, at 4 steps (the turbo's use) and 32 steps, fixed noise.

    *old* is the mean over all the named concepts, not a chosen few: fine-tuning damages some concepts more than
    others. *gap* = 32-step minus 4-step precision: how much the model has become one that needs many steps."""
    figures = {}
    for steps in (FEW_STEPS, MANY_STEPS):
        new = generate(model, family, NEW_WORD, steps)
        per_concept = old_precision(model, family, steps)
        figures[f"new_precision_{steps}"] = precision(new, NEW_CONCEPT_PHASE)
        figures[f"new_coverage_{steps}"] = coverage(new, NEW_CONCEPT_PHASE)
        figures[f"new_modes_{steps}"] = modes_drawn(new, NEW_CONCEPT_PHASE)
        figures[f"old_precision_{steps}"] = sum(per_concept.values()) / len(per_concept)
    figures["old_gap"] = figures[f"old_precision_{MANY_STEPS}"] - figures[f"old_precision_{FEW_STEPS}"]
    figures["new_gap"] = figures[f"new_precision_{MANY_STEPS}"] - figures[f"new_precision_{FEW_STEPS}"]
    return figures
