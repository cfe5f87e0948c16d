# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""Score fine-tunes of a step-distilled model against their base: was the concept learned, was the few-step quality kept?

    python evaluate_dopsd.py --pretrained_model_name_or_path Tongyi-MAI/Z-Image-Turbo \\
        --lora dopsd=out/dopsd-corgi --sft_lora out/sft-corgi --eval_file corgi_eval.jsonl --output_dir eval_out

Every model (base, each LoRA or fine-tuned transformer) generates every prompt of the eval file with the same seeds, at
the deployment step count, through pipeline_dopsd.py; the noise of a (prompt, seed) is the same for every model, so
columns differ only by the weights. Then the images are scored (see dopsd_metrics.py) and written as
``metrics.json``, ``metrics.md`` (one row per model), ``grid.png`` and ``images/<model>/``.

The eval file is JSON lines, one prompt per line:

    {"prompt": "a photo of [V] dog on a beach", "reference_image": "corgi/01.jpg", "class_name": "dog"}

``reference_image`` (a path relative to the eval file) enables the fidelity metrics for that row; ``source_image`` (a
path or a list of paths, FLUX.2-klein only) makes the row an edit: every model edits those sources with the prompt as
the instruction, and ``reference_image`` is then the target edit the fidelity is measured to; ``class_name``
replaces the concept token (``concept_token``, default "[V]") in the prompt CLIP-S scores; ``concept_mode``
("object" or "style", by default "style" when the prompt says "[V] style" or "style of [V]") picks the judge's question.
Other keys are ignored.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import dopsd_flags as flags
import dopsd_metrics as metrics
from dopsd_args import UserError, first_line, load_model_index, read_model_config, run_main
from dopsd_data import json_lines, open_image
from pipeline_dopsd import family_class

logger = logging.getLogger("dopsd.evaluate")

DEFAULT_CONCEPT_TOKEN = "[V]"
# Local paths of LoRAs and transformers are checked before loading; anything else of this shape may be a Hub repo.
HUB_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
COLUMN_LABEL = re.compile(r"^[\w.+-]+$")  # "sft+adapter" too


def make_parser() -> argparse.ArgumentParser:
    p = flags.Parser(description=__doc__.splitlines()[0])
    models = p.add_argument_group("models")
    models.add_argument("--pretrained_model_name_or_path", "--pretrained_model", required=True, type=flags.text,
                        help="The base model (a diffusers folder or Hub id), e.g. Tongyi-MAI/Z-Image-Turbo.")
    models.add_argument("--revision", default=None, type=flags.text, help="Revision of the base model on the Hub.")
    models.add_argument("--variant", default=None, type=flags.text, help="Weight variant of the base model, e.g. fp16.")
    models.add_argument("--cache_dir", default=None, type=flags.text, help="Cache folder for downloaded models.")
    models.add_argument("--lora", action="append", default=[], type=flags.text, metavar="[NAME=]PATH",
                        help="A LoRA to evaluate: a folder with pytorch_lora_weights.safetensors, a .safetensors file "
                             "or a Hub repo. Repeat to compare several side by side; NAME labels its column.")
    models.add_argument("--sft_lora", default=None, type=flags.text, metavar="[NAME=]PATH",
                        help="A LoRA trained with --method sft, shown as its own column (labelled 'sft' by default, 'sft+adapter' "
                             "when its args.json names a --training_adapter, which is not loaded: it is dropped after "
                             "training).")
    models.add_argument("--transformer", action="append", default=[], type=flags.text, metavar="[NAME=]PATH",
                        help="A fully fine-tuned transformer (its folder, or a folder holding transformer/), instead of "
                             "--lora. Repeatable.")

    data = p.add_argument_group("prompts and generation")
    data.add_argument("--eval_file", required=True, type=flags.text,
                      help="JSON lines: prompt, optional reference_image (relative to the file), source_image (makes "
                           "the row an edit of those images, FLUX.2-klein), class_name, concept_token, concept_mode.")
    data.add_argument("--output_dir", default="eval_out", type=flags.text, help="Where metrics.json, metrics.md, grid.png and images/ go (default: %(default)s).")
    data.add_argument("--num_inference_steps", type=flags.positive_int, default=None,
                      help="Sampling steps (default: the family's native count, 8 for Z-Image-Turbo, 4 for FLUX.2-klein).")
    # Both families' latents are a sixteenth of the image (VAE factor 8, 2x2 patches).
    data.add_argument("--height", type=flags.integer(16, multiple_of=16), default=None,
                      help="Image height, a multiple of 16 (default: the family's default size).")
    data.add_argument("--width", type=flags.integer(16, multiple_of=16), default=None,
                      help="Image width, a multiple of 16 (default: the family's default size).")
    data.add_argument("--seeds", default="0,1", type=flags.seed_list,
                      help="Comma-separated seeds; every prompt is generated once per seed, with the same noise for every model "
                           "(default: %(default)s).")

    scoring = p.add_argument_group("metrics")
    scoring.add_argument("--dino_model", default="facebook/dinov2-small", type=flags.text,
                         help="DINO model for the DINO distance, a DINOv2 or DINOv3 ViT from transformers (default: %(default)s).")
    scoring.add_argument("--clip_model", default="openai/clip-vit-large-patch14", type=flags.text, help="CLIP model for CLIP-I and CLIP-S (default: %(default)s).")
    scoring.add_argument("--lpips", action="store_true",
                         help="Also compute LPIPS-VGG to the reference and to the base image (needs `pip install lpips`).")
    scoring.add_argument("--vlm_judge", default=None, type=flags.text, metavar="QWEN3_VL",
                         help="A Qwen3-VL model that judges concept consistency (VLM-J), e.g. Qwen/Qwen3-VL-8B-Instruct. Off by default.")
    scoring.add_argument("--quality_warn_ratio", type=flags.positive_number, default=metrics.DEFAULT_QUALITY_WARN_RATIO,
                         help="Flag models whose sharpness ratio to the base falls below this: blur, few-step quality lost "
                              "(default: %(default)s).")

    runtime = p.add_argument_group("runtime")
    runtime.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                         help="Weight dtype of the generating pipeline and the judge (default: bf16 on a GPU, no on CPU).")
    runtime.add_argument("--device", default=None, type=flags.text, help="Torch device (default: cuda if available, else cpu).")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs, checked before any model is loaded


@dataclass
class EvalPrompt:
    prompt: str
    class_name: str | None
    concept_token: str
    concept_mode: str
    reference_path: str | None = None
    reference: Image.Image | None = None
    source_paths: list[str] = field(default_factory=list)
    sources: list[Image.Image] = field(default_factory=list)

    def scoring_prompt(self) -> str:
        """The prompt CLIP-S scores: CLIP does not know the concept token, so the class name stands in for it."""
        text = self.prompt.replace(self.concept_token, self.class_name or "")
        return re.sub(r"\s+", " ", text).strip()


def read_eval_file(path: str) -> list[EvalPrompt]:
    eval_file = Path(path)
    if not eval_file.is_file():
        raise UserError(f"--eval_file {path} does not exist: pass a JSON-lines file with one {{\"prompt\": ...}} per line.")
    try:
        text = eval_file.read_bytes().decode("utf-8-sig")  # a byte-order mark (Windows editors) is accepted
    except OSError as error:
        raise UserError(f"cannot read --eval_file {path} ({error.strerror}): make it readable.") from None
    except UnicodeDecodeError as error:
        raise UserError(f"--eval_file {path} is not UTF-8 text (byte {error.start}): re-save it as UTF-8.") from None
    prompts = []
    for _, where, row in json_lines(text, path, example='{"prompt": "a photo of [V] dog", ...}', separator=" line "):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f'{where} has no "prompt": every line needs {{"prompt": "a photo of [V] dog", ...}}.')
        for key in ("reference_image", "class_name", "concept_token"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise UserError(f'{where}: "{key}" must be a string, got {type(row[key]).__name__}.')
        token = row.get("concept_token") or DEFAULT_CONCEPT_TOKEN
        mode = row.get("concept_mode") or guess_concept_mode(row["prompt"], token)
        if mode not in metrics.JUDGE_LABELS:
            raise UserError(f'{where}: "concept_mode" must be "object" or "style", got {mode!r}.')
        item = EvalPrompt(row["prompt"], row.get("class_name"), token, mode)
        if row.get("reference_image"):
            item.reference_path, item.reference = _eval_image(eval_file, row["reference_image"], where, "reference image",
                                                              " or drop the key")
        if row.get("source_image") is not None:
            names = [row["source_image"]] if isinstance(row["source_image"], str) else row["source_image"]
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise UserError(f'{where}: "source_image" must be a path or a list of paths (relative to the eval file), '
                                f"got {row['source_image']!r}.")
            for name in names:
                path, image = _eval_image(eval_file, name, where, "source image")
                item.source_paths.append(path)
                item.sources.append(image)
        prompts.append(item)
    if not prompts:
        raise UserError(f"--eval_file {path} has no prompts: add lines like {{\"prompt\": \"a photo of [V] dog\"}}.")
    return prompts


def _eval_image(eval_file: Path, name: str, where: str, what: str, alternative: str = "") -> tuple[str, Image.Image]:
    """(path, image) of an image an eval row names relative to the eval file."""
    path = eval_file.parent / name
    if not path.is_file():
        raise UserError(f"{where}: {what} {path} does not exist: fix the path (relative to the eval file){alternative}.")
    return str(path), open_image(path, str(path))


@dataclass
class Sample:
    """One image per model: a prompt of the eval file (its index there) and a seed."""

    index: int
    prompt: EvalPrompt
    seed: int

    @property
    def file_name(self) -> str:
        return f"p{self.index:03d}_seed{self.seed}.png"


def make_samples(prompts: list[EvalPrompt], seeds: list[int]) -> list[Sample]:
    return [Sample(index, prompt, seed) for index, prompt in enumerate(prompts) for seed in seeds]


def guess_concept_mode(prompt: str, token: str) -> str:
    text, token = prompt.lower(), token.lower()
    return "style" if f"{token} style" in text or f"style of {token}" in text else "object"


@dataclass
class Column:
    """One model of the comparison: the base, a LoRA on it, or a fine-tuned transformer."""

    name: str
    kind: str  # "base", "lora" or "transformer"
    source: str
    recipe: str | None = None  # how a LoRA of ours was trained ("sft + training adapter X"), from its args.json
    images: list[Image.Image] = field(default_factory=list)  # one per Sample, in order
    rows: list[dict] = field(default_factory=list)  # per-sample metrics, in the same order
    summary: dict = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return re.sub(r"[^\w.-]", "_", self.name)


def parse_column(spec: str, kind: str, flag: str, default_name: str | None = None) -> Column:
    name, sep, source = spec.partition("=")
    if not sep or not COLUMN_LABEL.match(name):
        name, source = None, spec
    if not source:
        raise UserError(f"{flag} {spec!r} names no model: use {flag} PATH or {flag} NAME=PATH.")
    if not Path(source).exists() and not HUB_REPO_ID.match(source):
        raise UserError(f"{flag} {source} does not exist: pass a local folder or file, or a Hub repo id like user/repo.")
    recipe = training_recipe(source) if kind == "lora" else None
    if default_name == "sft" and recipe and "training adapter" in recipe:
        default_name = "sft+adapter"
    return Column(name=name or default_name or default_column_name(source), kind=kind, source=source, recipe=recipe)


def training_recipe(source: str) -> str | None:
    """The method (and training adapter) a LoRA was trained with, read from the args.json that train_dopsd_lora.py
    writes beside it (in the run folder, which is above a checkpoint-N); None for other LoRAs. The table shows it, so
    an SFT baseline trained with a training adapter is labelled as such (its adapter is not loaded: it was dropped
    after training, as in use)."""
    path = Path(source)
    folder = path.parent if path.is_file() else path
    candidates = [folder / "args.json"] + ([folder.parent / "args.json"] if folder.name.startswith("checkpoint-") else [])
    for candidate in candidates:
        if candidate.is_file():
            try:
                saved = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            method = saved.get("method") if isinstance(saved, dict) else None
            if method not in ("dopsd", "sft"):
                return None
            adapter = saved.get("training_adapter")
            return f"{method} + training adapter {adapter}" if adapter else method
    return None


def default_column_name(source: str) -> str:
    """The folder or repo name; for out/checkpoint-500/pytorch_lora_weights.safetensors, checkpoint-500."""
    path = Path(source.rstrip("/")).absolute()
    return path.parent.name if path.name == "pytorch_lora_weights.safetensors" else path.stem


def model_columns(args) -> list[Column]:
    if args.transformer and (args.lora or args.sft_lora):
        raise UserError("--transformer replaces the whole transformer, --lora and --sft_lora add to the base one: evaluate "
                        "them in separate runs, or pass an SFT full fine-tune as another --transformer sft=PATH.")
    columns = [Column("base", "base", args.pretrained_model_name_or_path)]
    columns += [parse_column(spec, "lora", "--lora") for spec in args.lora]
    if args.sft_lora:
        columns.append(parse_column(args.sft_lora, "lora", "--sft_lora", default_name="sft"))
    columns += [parse_column(spec, "transformer", "--transformer") for spec in args.transformer]
    names = [c.name for c in columns]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"two columns are named {name!r}{' (reserved for the base model)' if name == 'base' else ''}: "
                            "label them with NAME=PATH.")
    return columns


def check_scoring_models(args, prompts: list[EvalPrompt]):
    """Each scoring model's config can be read: a typo or a missing download fails now, not after the generation."""
    needs_references = any(p.reference is not None for p in prompts)
    wanted = [("--dino_model", args.dino_model, needs_references), ("--clip_model", args.clip_model, True),
              ("--vlm_judge", args.vlm_judge, bool(args.vlm_judge) and needs_references)]
    for flag, name, needed in wanted:
        if needed:
            read_model_config(flag, name, args.cache_dir, "pass a transformers model id or a local folder with config.json.")


def check_base_model(args, prompts: list[EvalPrompt]):
    """A supported family (read from model_index.json, no weights loaded) that can edit if a row is an edit, and a
    distilled one at the default steps."""
    config = load_model_index(args)
    try:
        family_class(config["_class_name"])
        if edit := next((p for p in prompts if p.sources), None):
            family_class(config["_class_name"], "edit")
    except ValueError as error:
        raise UserError(str(error) + (f" (the eval file's {edit.prompt!r} has a source_image)" if edit else "")) from None
    if config.get("is_distilled") is False and args.num_inference_steps is None:
        raise UserError(f"{args.pretrained_model_name_or_path} is not step-distilled (is_distilled=false): its few-step "
                        "output is not a deployment quality; pass the distilled model or --num_inference_steps explicitly.")


# ----------------------------------------------------------------------------------------------------------------------
# Generation: one pipeline serves every column


def load_pipeline(args, dtype):
    from pipeline_dopsd import DOPSDPipeline

    pipe = DOPSDPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                                         cache_dir=args.cache_dir, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def load_lora(pipe, column: Column, adapter_name: str):
    path = Path(column.source)
    location, weight = (str(path.parent), {"weight_name": path.name}) if path.is_file() else (column.source, {})
    try:
        pipe.load_lora_weights(location, adapter_name=adapter_name, **weight)
    except Exception as error:  # noqa: BLE001 -- loaders raise many types; the user problem is the same
        raise UserError(f"cannot load LoRA {column.source} ({first_line(error)}): pass a diffusers LoRA for this "
                        f"{pipe.family.display_name} base model.") from None
    # diffusers only warns when no key matches the transformer; an untouched column would pass for a harmless LoRA.
    if adapter_name not in getattr(pipe.transformer, "peft_config", {}):
        raise UserError(f"LoRA {column.source} has no weights for this transformer: is it a LoRA for "
                        f"{pipe.family.display_name}?")


def load_transformer_weights(pipe, column: Column, dtype):
    """Copy a fine-tuned transformer's weights into the pipeline's (the base columns are already generated)."""
    path = Path(column.source)
    subfolder = "transformer" if (path / "transformer" / "config.json").is_file() else None
    try:
        finetuned = type(pipe.transformer).from_pretrained(column.source, subfolder=subfolder, dtype=dtype)
        pipe.transformer.load_state_dict(finetuned.state_dict())
    except Exception as error:  # noqa: BLE001
        raise UserError(f"cannot load transformer {column.source} ({first_line(error)}): pass the transformer folder "
                        f"that a full fine-tune of this {pipe.family.display_name} saved.") from None


def generate_column(pipe, column: Column, samples: list[Sample], args):
    for sample in samples:
        # A fresh CPU generator per sample gives every model the same noise, on any device.
        generator = torch.Generator("cpu").manual_seed(sample.seed)
        try:
            image = pipe(prompt=sample.prompt.prompt, image=sample.prompt.sources or None,
                         num_inference_steps=args.num_inference_steps, height=args.height, width=args.width,
                         generator=generator).images[0]
        except ValueError as error:
            raise UserError(f"cannot generate {sample.prompt.prompt!r}: {error}") from None
        column.images.append(image)


def generate_all(columns: list[Column], samples: list[Sample], args, dtype) -> tuple[str, int]:
    """Fill every column's images and return (family name, steps used).

    The base comes first, so a --transformer may overwrite the base weights. Nothing of the pipeline is returned: it
    must be freed before the scoring models are loaded.
    """
    pipe = load_pipeline(args, dtype)
    for column in columns:
        logger.info("generating %d images with %s", len(samples), column.name)
        if column.kind == "lora":
            adapter_name = f"eval_{column.folder}"
            load_lora(pipe, column, adapter_name)
            generate_column(pipe, column, samples, args)
            pipe.unload_lora_weights()
        else:
            if column.kind == "transformer":
                load_transformer_weights(pipe, column, dtype)
            generate_column(pipe, column, samples, args)
    return pipe.family.display_name, args.num_inference_steps or pipe.family.native_steps


# ----------------------------------------------------------------------------------------------------------------------
# Scoring: one scoring model at a time, so the largest of them sets the memory needed


def score_model_free(columns: list[Column], samples: list[Sample], lpips_model):
    base = columns[0]
    for column in columns:
        ratios = metrics.sharpness_ratios(column.images, base.images)
        for i, (sample, image) in enumerate(zip(samples, column.images)):
            row = {
                "prompt": sample.prompt.prompt, "seed": sample.seed, "image": f"images/{column.folder}/{sample.file_name}",
                "reference_image": sample.prompt.reference_path,
                **({"source_image": sample.prompt.source_paths} if sample.prompt.sources else {}),
                "high_frequency_energy": metrics.high_frequency_energy(image), "sharpness_ratio": ratios[i],
            }
            if lpips_model is not None:
                row["lpips_base"] = metrics.lpips_distances(lpips_model, [image], [base.images[i]])[0]
            column.rows.append(row)


def with_reference(samples: list[Sample]) -> list[int]:
    return [i for i, sample in enumerate(samples) if sample.prompt.reference is not None]


def score_with_references(columns, samples, name, score):
    """Fill rows[name] for the samples that have a reference image, with score(images, references) -> list."""
    indices = with_reference(samples)
    if not indices:
        return
    references = [samples[i].prompt.reference for i in indices]
    for column in columns:
        for i, value in zip(indices, score([column.images[i] for i in indices], references)):
            column.rows[i][name] = value


def score_dino(columns, samples, args):
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(args.dino_model, cache_dir=args.cache_dir).to(args.device).eval()
    processor = AutoImageProcessor.from_pretrained(args.dino_model, cache_dir=args.cache_dir)
    score_with_references(columns, samples, "dino_distance", lambda images, refs: metrics.dino_distances(model, processor, images, refs))


def score_clip(columns, samples, args):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(args.clip_model, cache_dir=args.cache_dir).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.clip_model, cache_dir=args.cache_dir)
    score_with_references(columns, samples, "clip_i", lambda images, refs: metrics.clip_image_similarities(model, processor, images, refs))
    texts = [sample.prompt.scoring_prompt() for sample in samples]
    for column in columns:
        for row, value in zip(column.rows, metrics.clip_text_scores(model, processor, column.images, texts)):
            row["clip_s"] = value


def score_vlm_judge(columns, samples, args, dtype):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.vlm_judge, cache_dir=args.cache_dir, dtype=dtype)
    model = model.to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.vlm_judge, cache_dir=args.cache_dir)
    for column in columns:
        for i in with_reference(samples):
            prompt = samples[i].prompt
            score, answer = metrics.judge_concept(model, processor, column.images[i], prompt.reference, prompt.concept_mode)
            column.rows[i].update(vlm_judge=score, vlm_judge_answer=answer)


def score_all(columns, samples, args, dtype) -> list[str]:
    """Fill every column's rows; return notes on what was skipped and why."""
    from diffusers.training_utils import free_memory

    notes = []
    lpips_model = None
    if args.lpips:
        lpips_model = metrics.load_lpips_model(args.device)
        if lpips_model is None:
            notes.append(metrics.LPIPS_MISSING_NOTE)
    score_model_free(columns, samples, lpips_model)
    if lpips_model is not None:
        score_with_references(columns, samples, "lpips_reference", lambda images, refs: metrics.lpips_distances(lpips_model, images, refs))
    has_references = bool(with_reference(samples))
    if has_references:
        score_dino(columns, samples, args)
        free_memory()
    else:
        notes.append("No row of the eval file has a reference_image: DINO distance, CLIP-I and VLM-J were not computed.")
    score_clip(columns, samples, args)
    free_memory()
    if args.vlm_judge and has_references:
        score_vlm_judge(columns, samples, args, dtype)
        unparsed = sum(1 for c in columns for r in c.rows if "vlm_judge_answer" in r and r["vlm_judge"] is None)
        if unparsed:
            notes.append(f"VLM-J: {unparsed} judge answers named no label and were left out (see vlm_judge_answer).")
    return notes


# ----------------------------------------------------------------------------------------------------------------------
# Outputs

# (key, table header, how to read it), in table order.
METRICS = [
    ("dino_distance", "DINO dist. ↓", "concept fidelity: 1 - cosine of DINO features, generated vs reference image"),
    ("clip_i", "CLIP-I ↑", "concept fidelity: cosine of CLIP image embeddings, generated vs reference image"),
    ("vlm_judge", "VLM-J ↑", "concept fidelity: Qwen3-VL verdict, 4 = same instance / highly consistent style, 1 = different"),
    ("lpips_reference", "LPIPS ref. ↓", "perceptual distance to the reference image"),
    ("clip_s", "CLIP-S ↑", "prompt alignment: cosine of CLIP image and text embeddings, concept token -> class name"),
    ("sharpness_ratio", "sharpness ≈1", "few-step quality kept: high-frequency energy relative to the base image of the "
                                        "same prompt and noise; well below 1 is blur, well above 1 grain"),
    ("high_frequency_energy", "HF energy", "mean squared Laplacian of the luminance (compare between columns only)"),
    ("lpips_base", "LPIPS base", "perceptual distance to the base image of the same prompt and noise (how far the model moved)"),
]


def summarize(column: Column) -> dict:
    summary = {}
    for key, _, _ in METRICS:
        values = [row[key] for row in column.rows if row.get(key) is not None]
        if values:
            summary[key] = float(np.mean(values))
            summary[f"{key}_count"] = len(values)
    return summary


def quality_warnings(columns, threshold) -> dict[str, str]:
    """Model name -> warning, for the models whose sharpness ratio to the base is below threshold."""
    warnings = {}
    for column in columns[1:]:
        if message := metrics.few_step_quality_warning(column.summary["sharpness_ratio"], threshold):
            warnings[column.name] = message
    return warnings


def markdown_table(columns, config, notes, warnings) -> str:
    shown = [m for m in METRICS if any(m[0] in c.summary for c in columns)]
    lines = [
        f"# Evaluation of {config['base']}",
        "",
        f"{config['num_inference_steps']} steps, {config['num_prompts']} prompts x seeds {config['seeds']}; every model "
        "gets the same noise per prompt and seed.",
        "",
        "| model | kind | " + " | ".join(header for _, header, _ in shown) + " |",
        "|---|---|" + "---:|" * len(shown),
    ]
    for column in columns:
        flag = " ⚠" if column.name in warnings else ""
        cells = [f"{column.summary[key]:.4g}" if key in column.summary else "–" for key, _, _ in shown]
        kind = f"{column.kind} ({column.recipe})" if column.recipe else column.kind
        lines.append(f"| {column.name}{flag} | {kind} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- **{header}**: {meaning}" for _, header, meaning in shown)]
    if warnings or notes:
        lines += ["", *(f"> ⚠ **{name}**: {message}" for name, message in warnings.items()), *(f"> {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def labelled_grid(columns: list[Column]) -> Image.Image:
    """Rows = prompt x seed, columns = base | each model, names in a header strip."""
    width, height = columns[0].images[0].size
    font = ImageFont.load_default(size=max(10, width // 20))  # readable at 64 px and at 1024 px alike
    header = int(font.size * 1.4)
    grid = Image.new("RGB", (width * len(columns), header + height * len(columns[0].images)), "white")
    draw = ImageDraw.Draw(grid)
    for c, column in enumerate(columns):
        name = column.name
        while len(name) > 1 and draw.textlength(name, font=font) > width - 4:
            name = name[:-1]  # a long label must not run into the next column
        draw.text((c * width + 2, 1), name, fill="black", font=font)
        for r, image in enumerate(column.images):
            grid.paste(image.resize((width, height)), (c * width, header + r * height))
    return grid


def write_outputs(output_dir: Path, columns, samples, config, notes, warnings):
    for column in columns:
        folder = output_dir / "images" / column.folder
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(column.images):
            image.save(folder / samples[i].file_name)
    report = {
        "config": config,
        "notes": notes,
        "warnings": warnings,
        "models": {c.name: {"kind": c.kind, "source": c.source, "recipe": c.recipe, "summary": c.summary, "rows": c.rows}
                   for c in columns},
    }
    (output_dir / "metrics.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (output_dir / "metrics.md").write_text(markdown_table(columns, config, notes, warnings), encoding="utf-8")
    labelled_grid(columns).save(output_dir / "grid.png")


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # progress of this script only; the libraries' INFO logs would drown it
    prompts = read_eval_file(args.eval_file)
    seeds = args.seeds  # a list: flags.seed_list parsed and checked it
    columns = model_columns(args)
    check_base_model(args, prompts)
    check_scoring_models(args, prompts)
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --output_dir {output_dir} ({error.strerror}): choose a writable folder.") from None
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.mixed_precision or ("bf16" if args.device.startswith("cuda") else "no")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)

    samples = make_samples(prompts, seeds)
    family_name, steps = generate_all(columns, samples, args, dtype)
    from diffusers.training_utils import free_memory

    free_memory()
    notes = score_all(columns, samples, args, dtype)
    for column in columns:
        column.summary = summarize(column)
    warnings = quality_warnings(columns, args.quality_warn_ratio)
    for name, message in warnings.items():
        logger.warning("%s: %s", name, message)
    height, width = columns[0].images[0].height, columns[0].images[0].width
    config = {
        "base": args.pretrained_model_name_or_path, "revision": args.revision, "family": family_name,
        "num_inference_steps": steps, "height": height, "width": width, "seeds": seeds, "num_prompts": len(prompts),
        "eval_file": args.eval_file, "dino_model": args.dino_model, "clip_model": args.clip_model, "lpips": args.lpips,
        "vlm_judge": args.vlm_judge, "quality_warn_ratio": args.quality_warn_ratio, "mixed_precision": precision,
    }
    write_outputs(output_dir, columns, samples, config, notes, warnings)
    logger.info("wrote %s/metrics.json, metrics.md and grid.png", output_dir)
    return output_dir


if __name__ == "__main__":
    run_main(main)
