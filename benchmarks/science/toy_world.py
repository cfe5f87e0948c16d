# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""A 2-D concept world in which D-OPSD's claim can be measured on a CPU (the research notes' toy_world.md, Iteration 3).

A *concept* is a ring of four Gaussian modes of radius RING_RADIUS at angles phase + j * pi/2; the concept is its phase.
Eight named concepts have their own word vectors; "generic" and "[V]" are two more words, and "[V]" is never seen
before fine-tuning. A condition is [word vector, reference feature, reference flag]: the student sees the word alone
(text only), the teacher also sees the feature of one sample of the concept, which a fixed "encoder" computes the way
a VLM would describe an image: it keeps the concept's phase and drops which mode the sample came from.

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
# A sample is "sharp" when it lies within this distance of one of its concept's modes; a sample on the ring at a wrong
# phase lands there by chance about 19 % of the time.
SHARP_RADIUS = 4 * MODE_STD
# A mode counts as produced when it receives at least this fraction of its fair share of the samples.
MODE_SHARE = 0.1

NAMED_PHASES = tuple(k * (math.pi / 2) / 8 for k in range(8))
NEW_CONCEPT_PHASE = 0.69  # between named concepts 3 and 4: a concept the models have never been told about
NAMED_WORDS = tuple(f"concept {k}" for k in range(len(NAMED_PHASES)))
WORDS = NAMED_WORDS + ("generic", "[V]")
NEW_WORD = "[V]"
GENERIC_WORD = "generic"

WORD_DIM = 16
CONTEXT_DIM = WORD_DIM + 2 + 1  # word, reference feature (cos 4 phi, sin 4 phi), reference flag
SIGMA_FREQUENCIES = 2.0 ** torch.arange(8)  # sin/cos features of sigma at 1 .. 128 rad per unit of sigma

# The draw of the word vectors is part of the world: with this one an unseen word + a reference follows the reference
# (the teacher gate of build_models.py passes); with seeds 1, 2, 14 and 32 it does not.
WORLD_SEED = 0
WORD_VECTORS = torch.randn(len(WORDS), WORD_DIM, generator=torch.Generator().manual_seed(WORLD_SEED))

CHECKPOINTS = Path(__file__).parent / "checkpoints"
EVAL_SAMPLES = 2000
EVAL_SEED = 1234
FEW_STEPS = 4


def phase_of(word: str) -> float:
    return NEW_CONCEPT_PHASE if word == NEW_WORD else NAMED_PHASES[WORDS.index(word)]


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


def reference_feature(points: torch.Tensor) -> torch.Tensor:
    """The concept's phase as the teacher's encoder reports it: 4 * angle folds the four modes onto one direction.

    With the raw point instead, the in-context ability does not generalise to unseen phases (toy_world.md)."""
    angle = 4 * torch.atan2(points[:, 1], points[:, 0])
    return torch.stack([angle.cos(), angle.sin()], dim=1)


def contexts(word_ids: torch.Tensor, references: torch.Tensor | None = None) -> torch.Tensor:
    """[word vector, reference feature, reference flag] per row; without references the last three are zero."""
    words = WORD_VECTORS[word_ids]
    if references is None:
        return torch.cat([words, torch.zeros(len(words), 3)], dim=1)
    return torch.cat([words, reference_feature(references), torch.ones(len(words), 1)], dim=1)


def word_ids(words: list[str]) -> torch.Tensor:
    return torch.tensor([WORDS.index(w) for w in words])


# ----------------------------------------------------------------------------------------------------------------------
# The network and the family


class VelocityMLP(torch.nn.Module):
    """v(x, sigma, context) in the flow convention: [x, sin/cos(sigma), context] -> 256 -> 2 residual layers -> 2."""

    def __init__(self, width: int = 256):
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
    """float16 weights: the two shipped models together stay near 0.6 MB."""
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_model(path: Path) -> VelocityMLP:
    model = VelocityMLP()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


class ToyFamily(ModelFamily):
    """The concept world as a model family: states are points (B, 2), conditions are {"context": (CONTEXT_DIM,)}.

    Prompts are words of WORDS; the teacher's "images" are reference points. There is no pipeline behind it, and a point
    has no size: ``height`` and ``width`` are accepted for the family interface and ignored.
    """

    pipeline_class_name = "ToyConceptWorld"
    display_name = "2-D concept world"
    native_steps = FEW_STEPS
    default_learning_rate = 3e-4
    tags = ("toy",)

    def __init__(self):
        super().__init__(pipe=None)

    def encode_student(self, prompts):
        return [{"context": c} for c in contexts(word_ids(prompts))]

    def encode_teacher(self, prompts, images):
        return [{"context": c} for c in contexts(word_ids(prompts), torch.stack(list(images)))]

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
def generate(model, word: str, steps: int = FEW_STEPS, num_samples: int = EVAL_SAMPLES, seed: int = EVAL_SEED,
             reference_phase: float | None = None) -> torch.Tensor:
    """Euler samples of `word` (text only, or with one reference of `reference_phase` per sample), fixed noise."""
    family = ToyFamily()
    generator = torch.Generator().manual_seed(seed)
    noise = family.initial_noise(num_samples, generator=generator)
    if reference_phase is None:
        conditions = family.encode_student([word] * num_samples)
    else:
        references, _ = sample_concept(reference_phase, num_samples, generator)
        conditions = family.encode_teacher([word] * num_samples, references)
    return family.sample(model, family.collate(conditions), noise, family.sigmas(steps))


def nearest_mode(points: torch.Tensor, phase: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and distance to the nearest mode of the concept, per point."""
    distances = torch.cdist(points, mode_centres(phase))
    distance, mode = distances.min(dim=1)
    return mode, distance


def sharpness(points: torch.Tensor, phase: float) -> float:
    """Fraction of the points within SHARP_RADIUS of one of the concept's modes."""
    _, distance = nearest_mode(points, phase)
    return (distance < SHARP_RADIUS).float().mean().item()


def modes_covered(points: torch.Tensor, phase: float) -> int:
    """How many of the concept's modes receive at least MODE_SHARE of their fair share of the points."""
    mode, distance = nearest_mode(points, phase)
    counts = torch.bincount(mode[distance < SHARP_RADIUS], minlength=NUM_MODES)
    return int((counts >= MODE_SHARE * len(points) / NUM_MODES).sum())


def named_sharpness(model, steps: int = FEW_STEPS) -> dict[str, float]:
    """Sharpness of every named concept, text only."""
    return {w: sharpness(generate(model, w, steps), phase_of(w)) for w in NAMED_WORDS}


def mean_named_sharpness(model, steps: int = FEW_STEPS) -> float:
    per_concept = named_sharpness(model, steps)
    return sum(per_concept.values()) / len(per_concept)


def evaluate(model) -> dict[str, float]:
    """The figures of the science table, all at 4 steps with fixed noise, plus each named concept's sharpness.

    *old* is the mean over all eight named concepts, not a chosen few: fine-tuning damages some concepts far more than
    others (one can fall to 0.3 while the rest stay above 0.7), so the mean of any three depends on which three."""
    new = generate(model, NEW_WORD)
    per_concept = named_sharpness(model)
    return {
        "new_sharp": sharpness(new, NEW_CONCEPT_PHASE),
        "new_modes": modes_covered(new, NEW_CONCEPT_PHASE),
        "old_sharp": sum(per_concept.values()) / len(per_concept),
        **per_concept,
    }
