"""evaluate_dopsd.py and dopsd_metrics.py, offline: tiny pipelines, tiny random CLIP / DINOv2 / Qwen3-VL models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import dopsd_metrics as metrics
import evaluate_dopsd

SIZE = 32  # the tiny VAE downsamples by 2, so any multiple of 4 works; 32 still gives DINO and CLIP 4x4 patches


def textured_image(seed: int, size: int = SIZE) -> Image.Image:
    """Smooth colour blobs plus fine texture: something a blur visibly removes."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    image += rng.normal(0, 25, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------------
# Tiny scoring models and inputs, built once (the tiny pipelines are conftest's session fixture `tiny_models`)


def tiny_clip_tokenizer():
    """A character-level CLIP BPE tokenizer (no merges), built in memory."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


@pytest.fixture(scope="module")
def scorer_dirs(tmp_path_factory):
    """Tiny random CLIP and DINOv2 models with their processors, saved the way Hub checkpoints are."""
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        Dinov2Config,
        Dinov2Model,
    )

    root = tmp_path_factory.mktemp("scorers")
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    ))
    clip_image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    clip.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=clip_image_processor, tokenizer=tokenizer).save_pretrained(root / "clip")

    torch.manual_seed(1)
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=8, image_size=32))
    dino.save_pretrained(root / "dino")
    BitImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(root / "dino")
    return {"clip": root / "clip", "dino": root / "dino"}


@pytest.fixture(scope="module")
def random_lora(tiny_models, tmp_path_factory):
    """A LoRA with random non-zero A and B, so it changes the output (checked)."""
    from diffusers import ZImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = ZImagePipeline.from_pretrained(tiny_models / "z-image")
    pipe.set_progress_bar_config(disable=True)

    def generate():
        image = pipe("a photo of [V] toy", height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=0.0,
                     generator=torch.Generator().manual_seed(0)).images[0]
        return np.asarray(image)

    before = generate()
    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name="random")
    assert not np.array_equal(before, generate()), "the random LoRA must change the output"
    folder = tmp_path_factory.mktemp("lora")
    ZImagePipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name="random"),
                                     transformer_lora_adapter_metadata=config.to_dict())
    return folder


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    (folder / "refs").mkdir()
    textured_image(0).save(folder / "refs" / "toy.png")
    textured_image(1).resize((48, 80)).save(folder / "refs" / "style.png")  # another size: references are resized
    rows = [
        {"prompt": "a photo of [V] toy on a table", "reference_image": "refs/toy.png", "class_name": "toy"},
        {"prompt": "a harbour in [V] style", "reference_image": "refs/style.png", "class_name": "watercolor"},
        {"prompt": "a red bicycle"},  # no reference: only CLIP-S and sharpness
    ]
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def cli(tiny_models, scorer_dirs, eval_file, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", str(tiny_models / "z-image"), "--eval_file", str(eval_file),
        "--output_dir", str(output_dir), "--height", str(SIZE), "--width", str(SIZE), "--seeds", "0,1",
        "--dino_model", str(scorer_dirs["dino"]), "--clip_model", str(scorer_dirs["clip"]), "--device", "cpu", *extra,
    ]


# Fewer steps than Z-Image-Turbo's native 8 keep the module fast; test_full_transformer_column runs the default.
FAST = ("--num_inference_steps", "4")


@pytest.fixture(scope="module")
def full_run(tiny_models, scorer_dirs, eval_file, random_lora, tmp_path_factory):
    """One evaluation with every metric: base, a labelled LoRA, an SFT LoRA, LPIPS requested and the VLM judge."""
    output_dir = tmp_path_factory.mktemp("eval_out")
    evaluate_dopsd.main(cli(tiny_models, scorer_dirs, eval_file, output_dir, *FAST, "--lora", f"dopsd={random_lora}",
                            "--sft_lora", str(random_lora), "--lpips", "--vlm_judge", str(tiny_models / "qwen3-vl-teacher")))
    return output_dir


def load_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ----------------------------------------------------------------------------------------------------------------------
# Model-free metrics


def test_sharpness_ranks_a_blurred_image_below_its_original():
    originals = [textured_image(seed) for seed in range(3)]
    blurred = [image.filter(ImageFilter.GaussianBlur(1.5)) for image in originals]
    for original, soft in zip(originals, blurred):
        assert metrics.high_frequency_energy(soft) < metrics.high_frequency_energy(original)
    assert metrics.sharpness_ratio(originals, originals) == pytest.approx(1.0)
    ratio = metrics.sharpness_ratio(blurred, originals)
    assert ratio < metrics.DEFAULT_QUALITY_WARN_RATIO
    assert metrics.few_step_quality_warning(ratio) is not None
    assert metrics.few_step_quality_warning(1.0) is None


def test_high_frequency_energy_reads_pil_numpy_and_torch_alike():
    image = textured_image(4)
    array = np.asarray(image)
    expected = metrics.high_frequency_energy(image)
    assert metrics.high_frequency_energy(array) == pytest.approx(expected)
    assert metrics.high_frequency_energy(array / 255.0) == pytest.approx(expected)
    assert metrics.high_frequency_energy(torch.from_numpy(array / 255.0).permute(2, 0, 1)) == pytest.approx(expected)
    assert metrics.high_frequency_energy(Image.new("RGB", (8, 8), "gray")) == 0.0


def test_sharpness_ratio_needs_pairs():
    with pytest.raises(ValueError, match="paired"):
        metrics.sharpness_ratio([textured_image(0)], [])
    with pytest.raises(ValueError, match="same size"):
        metrics.sharpness_ratio([textured_image(0, 32)], [textured_image(0, 64)])


def test_judge_answers_parse_to_the_first_label_named():
    assert metrics.parse_judge_answer("Mostly same instance.", "object") == 3
    assert metrics.parse_judge_answer("different instance", "object") == 1
    assert metrics.parse_judge_answer("highly consistent", "style") == 4
    assert metrics.parse_judge_answer("a cat", "object") is None


# ----------------------------------------------------------------------------------------------------------------------
# Model-based metrics on tiny random models


def test_dino_embedding_averages_the_patch_tokens_then_normalises(scorer_dirs):
    """As the reference's run_score.py: normalise(mean(x_norm_patchtokens)), so a longer token weighs more (a mean of
    normalised tokens would weigh them all alike); transformers' last_hidden_state is that layer-normed output."""
    from transformers import AutoImageProcessor, AutoModel

    dino = AutoModel.from_pretrained(scorer_dirs["dino"])
    processor = AutoImageProcessor.from_pretrained(scorer_dirs["dino"])
    with torch.no_grad():  # a trained final LayerNorm's affine gives the tokens different lengths (the random one: sqrt(d))
        generator = torch.Generator().manual_seed(0)
        dino.layernorm.weight.copy_(torch.rand(dino.layernorm.weight.shape, generator=generator) + 0.5)
        dino.layernorm.bias.copy_(torch.randn(dino.layernorm.bias.shape, generator=generator))
    image = textured_image(3)
    with torch.no_grad():
        pixels = processor(images=[image], return_tensors="pt", do_resize=False, do_center_crop=False)["pixel_values"]
        patches = dino(pixel_values=pixels).last_hidden_state[:, 1:]
    ours = metrics.dino_embedding(dino, processor, [image])
    torch.testing.assert_close(ours, torch.nn.functional.normalize(patches.mean(dim=1), dim=-1))
    assert torch.linalg.vector_norm(ours, dim=-1).item() == pytest.approx(1.0)
    lengths = torch.linalg.vector_norm(patches, dim=-1)
    assert lengths.max() / lengths.min() > 1.05  # the tokens' lengths differ, so the two orders give different features
    mean_of_normalised = torch.nn.functional.normalize(patches, dim=-1).mean(dim=1)
    assert not torch.allclose(ours, torch.nn.functional.normalize(mean_of_normalised, dim=-1), atol=1e-4)


def test_model_metrics_run_on_tiny_models(scorer_dirs):
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor

    images, references = [textured_image(5), textured_image(6)], [textured_image(5, 80), textured_image(7)]
    dino = AutoModel.from_pretrained(scorer_dirs["dino"])
    dino_processor = AutoImageProcessor.from_pretrained(scorer_dirs["dino"])
    clip = AutoModel.from_pretrained(scorer_dirs["clip"])
    clip_processor = AutoProcessor.from_pretrained(scorer_dirs["clip"])

    distances = metrics.dino_distances(dino, dino_processor, images, references)
    assert len(distances) == 2 and all(np.isfinite(distances))
    assert metrics.dino_distances(dino, dino_processor, images[:1], images[:1])[0] == pytest.approx(0.0, abs=1e-6)
    similarities = metrics.clip_image_similarities(clip, clip_processor, images, references)
    assert len(similarities) == 2 and all(-1 <= s <= 1 for s in similarities)
    assert metrics.clip_image_similarities(clip, clip_processor, images[:1], images[:1])[0] == pytest.approx(1.0, abs=1e-5)
    scores = metrics.clip_text_scores(clip, clip_processor, images, ["a photo of a toy", "a watercolor harbour"])
    assert len(scores) == 2 and all(-1 <= s <= 1 for s in scores)


def test_lpips_distances_use_the_given_model():
    class MeanAbsoluteDifference(torch.nn.Module):
        """Stands in for lpips.LPIPS: the same call signature, inputs in [-1, 1]."""

        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, a, b):
            assert a.min() >= -1 and a.max() <= 1
            return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)

    image = textured_image(8)
    distances = metrics.lpips_distances(MeanAbsoluteDifference(), [image, image], [image, textured_image(9, 32)])
    assert distances[0] == 0.0 and distances[1] > 0


def test_vlm_judge_runs_on_the_tiny_qwen3_vl(tiny_models):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_models / "qwen3-vl-teacher")
    processor = AutoProcessor.from_pretrained(tiny_models / "qwen3-vl-teacher")
    score, answer = metrics.judge_concept(model, processor, textured_image(0), textured_image(1), "style", max_new_tokens=4)
    assert isinstance(answer, str)
    assert score is None or 1 <= score <= 4  # a random model rarely names a label


# ----------------------------------------------------------------------------------------------------------------------
# The command


def test_every_metric_is_written_to_json_and_table(full_run):
    report = json.loads((full_run / "metrics.json").read_text())
    assert list(report["models"]) == ["base", "dopsd", "sft"]
    assert report["config"]["num_inference_steps"] == 4
    assert metrics.LPIPS_MISSING_NOTE in report["notes"] or "lpips_reference" in report["models"]["base"]["summary"]
    for name, model in report["models"].items():
        summary = model["summary"]
        for key in ("dino_distance", "clip_i", "clip_s", "sharpness_ratio", "high_frequency_energy"):
            assert np.isfinite(summary[key]), (name, key)
        assert summary["dino_distance_count"] == 4 and summary["clip_s_count"] == 6  # 2 references x 2 seeds; 3 x 2
        assert len(model["rows"]) == 6
        assert all("vlm_judge_answer" in row for row in model["rows"] if "dino_distance" in row)
        for row in model["rows"]:
            assert (full_run / row["image"]).is_file()
    assert report["models"]["base"]["summary"]["sharpness_ratio"] == 1.0

    table = (full_run / "metrics.md").read_text()
    for expected in ("| model | kind |", "| base | base |", "| dopsd", "| sft", "DINO dist. ↓", "CLIP-S ↑", "sharpness ≈1"):
        assert expected in table
    grid = Image.open(full_run / "grid.png")
    assert grid.width == 3 * SIZE and grid.height >= 6 * SIZE


def test_a_blurry_model_is_flagged_in_the_table():
    prompt = evaluate_dopsd.EvalPrompt("a [V] toy", "toy", "[V]", "object")
    samples = evaluate_dopsd.make_samples([prompt], [0, 1])
    base = evaluate_dopsd.Column("base", "base", "base-model", images=[textured_image(s) for s in (0, 1)])
    blurry = evaluate_dopsd.Column("blurry", "lora", "sft-lora", images=[i.filter(ImageFilter.GaussianBlur(1.5)) for i in base.images])
    columns = [base, blurry]
    evaluate_dopsd.score_model_free(columns, samples, lpips_model=None)
    for column in columns:
        column.summary = evaluate_dopsd.summarize(column)
    warnings = evaluate_dopsd.quality_warnings(columns, metrics.DEFAULT_QUALITY_WARN_RATIO)
    assert list(warnings) == ["blurry"] and warnings["blurry"].startswith("few-step quality is slipping")
    config = {"base": "base-model", "num_inference_steps": 8, "num_prompts": 1, "seeds": [0, 1]}
    table = evaluate_dopsd.markdown_table(columns, config, notes=[], warnings=warnings)
    assert "| blurry ⚠ | lora |" in table and "| base | base |" in table


def test_lora_column_differs_from_base(full_run):
    base = load_png(full_run / "images" / "base" / "p000_seed0.png")
    lora = load_png(full_run / "images" / "dopsd" / "p000_seed0.png")
    assert not np.array_equal(base, lora)
    # The same LoRA under two labels is the same model on the same noise.
    assert np.array_equal(lora, load_png(full_run / "images" / "sft" / "p000_seed0.png"))


def test_base_images_are_paired_across_calls(full_run, tiny_models, scorer_dirs, eval_file, tmp_path):
    evaluate_dopsd.main(cli(tiny_models, scorer_dirs, eval_file, tmp_path, *FAST, "--seeds", "1"))
    for prompt_index in range(3):
        name = f"p{prompt_index:03d}_seed1.png"
        assert np.array_equal(load_png(tmp_path / "images" / "base" / name), load_png(full_run / "images" / "base" / name))
    # Different seeds are different noise.
    assert not np.array_equal(load_png(full_run / "images" / "base" / "p000_seed0.png"),
                              load_png(full_run / "images" / "base" / "p000_seed1.png"))


def test_full_transformer_column(tiny_models, scorer_dirs, eval_file, tmp_path):
    from diffusers import ZImageTransformer2DModel

    one_prompt = tmp_path / "one.jsonl"
    # One prompt keeps the native 8 steps cheap; an absolute reference path works too.
    one_prompt.write_text(json.dumps({"prompt": "a photo of [V] toy", "reference_image": str(eval_file.parent / "refs" / "toy.png")}))

    transformer = ZImageTransformer2DModel.from_pretrained(tiny_models / "z-image", subfolder="transformer")
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.mul_(1.05)
    transformer.save_pretrained(tmp_path / "finetune" / "transformer")
    evaluate_dopsd.main(cli(tiny_models, scorer_dirs, one_prompt, tmp_path / "out", "--seeds", "0",
                            "--transformer", f"full={tmp_path / 'finetune'}"))
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(report["models"]) == ["base", "full"]
    assert report["config"]["num_inference_steps"] == 8  # Z-Image-Turbo's native count, the default
    assert not np.array_equal(load_png(tmp_path / "out" / "images" / "base" / "p000_seed0.png"),
                              load_png(tmp_path / "out" / "images" / "full" / "p000_seed0.png"))


@pytest.mark.parametrize("problem, extra, message", [
    ("missing_file", [], "does not exist"),
    ("bad_json", [], "is not valid JSON"),
    ("no_prompt", [], 'has no "prompt"'),
    ("missing_reference", [], "reference image"),
    ("ok", ["--lora", "a", "--transformer", "b"], "--transformer replaces"),
    ("ok", ["--lora", "/no/such/lora"], "does not exist"),
    ("ok", ["--lora", "x=/tmp", "--lora", "x=/tmp"], "two columns are named 'x'"),
    ("ok", ["--seeds", "0,one"], "--seeds"),
])
def test_input_errors_are_one_line_and_exit_2(problem, extra, message, tmp_path, capsys):
    eval_file = tmp_path / "prompts.jsonl"
    contents = {
        "missing_file": None,
        "bad_json": '{"prompt": "a dog"}\n{"prompt": \n',
        "no_prompt": '{"class_name": "dog"}\n',
        "missing_reference": '{"prompt": "a [V] dog", "reference_image": "nope.png"}\n',
        "ok": '{"prompt": "a [V] dog"}\n',
    }[problem]
    if contents is not None:
        eval_file.write_text(contents)
    # The base model does not exist either: every one of these must be caught before any model is read.
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--eval_file", str(eval_file),
            "--output_dir", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        evaluate_dopsd.run_main(lambda: evaluate_dopsd.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_unknown_base_model_is_reported(tmp_path, capsys):
    eval_file = tmp_path / "prompts.jsonl"
    eval_file.write_text('{"prompt": "a dog"}\n')
    with pytest.raises(SystemExit):
        evaluate_dopsd.run_main(lambda: evaluate_dopsd.main([
            "--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--eval_file", str(eval_file),
            "--output_dir", str(tmp_path / "out")]))
    assert "model_index.json" in capsys.readouterr().err


def test_a_missing_scoring_model_fails_before_generation(tiny_models, scorer_dirs, eval_file, tmp_path, capsys):
    argv = cli(tiny_models, scorer_dirs, eval_file, tmp_path / "out", "--clip_model", str(tmp_path / "no-clip"))
    with pytest.raises(SystemExit):
        evaluate_dopsd.run_main(lambda: evaluate_dopsd.main(argv))
    assert "cannot read the config of --clip_model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_base_sft_with_adapter_and_dopsd_columns_are_labelled_from_their_runs(tmp_path):
    """base | SFT+adapter | D-OPSD: each LoRA column says how it was trained (read from the run's args.json, also
    above a checkpoint), an SFT LoRA trained with a training adapter gets its own default label, and the order is
    the order of the flags."""
    for run_name, saved in [("sft-run", {"method": "sft", "training_adapter": "ostris/adapter"}), ("dopsd-run", {"method": "dopsd"})]:
        (tmp_path / run_name / "checkpoint-4").mkdir(parents=True)
        (tmp_path / run_name / "args.json").write_text(json.dumps({**saved, "rank": 4}))
    args = evaluate_dopsd.make_parser().parse_args([
        "--pretrained_model_name_or_path", "base", "--eval_file", "e.jsonl",
        "--lora", f"sft+adapter={tmp_path / 'sft-run' / 'checkpoint-4'}", "--lora", f"dopsd={tmp_path / 'dopsd-run'}"])
    columns = evaluate_dopsd.model_columns(args)
    assert [(c.name, c.recipe) for c in columns] == [
        ("base", None), ("sft+adapter", "sft + training adapter ostris/adapter"), ("dopsd", "dopsd")]
    assert columns[1].folder == "sft_adapter"
    args = evaluate_dopsd.make_parser().parse_args([
        "--pretrained_model_name_or_path", "base", "--eval_file", "e.jsonl", "--sft_lora", str(tmp_path / "sft-run")])
    assert evaluate_dopsd.model_columns(args)[1].name == "sft+adapter"
    for column in columns:
        column.summary = {"sharpness_ratio": 1.0}
    config = {"base": "base", "num_inference_steps": 8, "num_prompts": 1, "seeds": [0]}
    table = evaluate_dopsd.markdown_table(columns, config, notes=[], warnings={})
    assert "| sft+adapter | lora (sft + training adapter ostris/adapter) |" in table and "| dopsd | lora (dopsd) |" in table


def test_edit_rows_edit_their_sources_and_score_against_the_target(tiny_models, scorer_dirs, tmp_path, capsys):
    """An eval row with source_image is an edit on klein: every model edits the sources, fidelity is to the target."""
    from pipeline_dopsd import DOPSDPipeline

    textured_image(2, 64).save(tmp_path / "before.png")  # klein takes sources of 64 px and more
    textured_image(3).save(tmp_path / "after.png")
    row = {"prompt": "make it night", "source_image": "before.png", "reference_image": "after.png"}
    (tmp_path / "edits.jsonl").write_text(json.dumps(row) + "\n")
    args = cli(tiny_models, scorer_dirs, tmp_path / "edits.jsonl", tmp_path / "out", "--seeds", "0")
    args[1] = str(tiny_models / "flux2-klein")
    evaluate_dopsd.main(args)
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    pipe = DOPSDPipeline.from_pretrained(str(tiny_models / "flux2-klein"), dtype=torch.float32)
    expected = pipe(prompt="make it night", image=[Image.open(tmp_path / "before.png").convert("RGB")], height=SIZE, width=SIZE,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    got = load_png(tmp_path / "out" / "images" / "base" / "p000_seed0.png").astype(np.float32)
    assert abs(got - np.round(expected * 255)).max() <= 1
    text = json.dumps(report)
    assert "dino_distance" in text and "before.png" in text
    # Z-Image cannot edit: refused before anything is generated.
    args[1] = str(tiny_models / "z-image")
    with pytest.raises(SystemExit):
        evaluate_dopsd.run_main(lambda: evaluate_dopsd.main(args))
    assert "Z-Image-Turbo has no editing path" in capsys.readouterr().err


def test_a_lora_of_another_family_is_one_short_line_naming_the_base(tiny_models, scorer_dirs, eval_file, tmp_path, capsys):
    from diffusers import Flux2KleinPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    klein = Flux2KleinPipeline.from_pretrained(tiny_models / "flux2-klein")
    # Full module names, as the training scripts' LoRAs list them: peft's mismatch error then runs to kilobytes.
    layers = [name for name, module in klein.transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    config = LoraConfig(r=4, lora_alpha=4, target_modules=layers, init_lora_weights=False)
    klein.transformer.add_adapter(config, adapter_name="klein")
    Flux2KleinPipeline.save_lora_weights(tmp_path / "klein_lora", transformer_lora_adapter_metadata=config.to_dict(),
                                         transformer_lora_layers=get_peft_model_state_dict(klein.transformer, adapter_name="klein"))
    argv = cli(tiny_models, scorer_dirs, eval_file, tmp_path / "out", *FAST, "--lora", str(tmp_path / "klein_lora"))
    with pytest.raises(SystemExit) as exit_info:
        evaluate_dopsd.run_main(lambda: evaluate_dopsd.main(argv))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Z-Image-Turbo" in lines[-1] and len(lines[-1]) < 500, lines[-1]
