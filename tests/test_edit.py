"""FLUX.2-klein editing LoRAs: the student is the stock editing path, the teacher also sees the target as its last
reference; rows, buckets, the condition cache, training through accelerate, and stock loading of the edit LoRA."""

import argparse
import json

import pytest
import torch
from PIL import Image

from conftest import REPO, load_stock, run_script
from dopsd_args import UserError
from dopsd_data import BucketBatches, ConditionCache, Example, collect_raw_examples
from pipeline_dopsd import Flux2KleinEditFamily, euler_step, family_class

EDITS = REPO / "examples" / "tiny_edit"
INSTRUCTION = "make it a moonlit night scene"


def picture(colour, size=(64, 64)):
    image = Image.new("RGB", size, colour)
    image.paste((20, 20, 220), (16, 16, 40, 40))
    return image


def one_step(family, pipe, condition, noise):
    sigmas = family.sigmas(1, 64, 64)
    with torch.no_grad():
        return family.decode(euler_step(noise, sigmas[0], sigmas[1], family.velocity(pipe.transformer, noise, sigmas[0], condition)),
                             output_type="latent")


@pytest.mark.parametrize("num_sources", [1, 2])
def test_student_and_teacher_are_the_stock_editing_path(klein, num_sources):
    family = Flux2KleinEditFamily(klein)
    sources = [picture((200, 40, 40)), picture((40, 200, 40), (80, 64))][:num_sources]
    target = picture((40, 40, 200))
    noise = family.initial_noise(1, 64, 64, torch.Generator().manual_seed(0))
    student = family.collate(family.encode_student([INSTRUCTION], [sources]), "cpu")
    teacher = family.collate(family.encode_teacher([INSTRUCTION], [target], [sources]), "cpu")
    # Image i of the references sits at position-id t = 10 (i + 1); the teacher's target comes last.
    assert student["reference_ids"][0, :, 0].unique().tolist() == [10 * (i + 1) for i in range(num_sources)]
    assert teacher["reference_ids"][0, :, 0].unique().tolist() == [10 * (i + 1) for i in range(num_sources + 1)]
    assert teacher["reference_ids"][0, -1, 0] == 10 * (num_sources + 1)
    stock_student = klein(prompt=INSTRUCTION, image=sources, num_inference_steps=1, height=64, width=64, latents=noise,
                          output_type="latent").images
    stock_teacher = klein(prompt=family.teacher_prompt(INSTRUCTION), image=[*sources, target], num_inference_steps=1,
                          height=64, width=64, latents=noise, output_type="latent").images
    assert (one_step(family, klein, student, noise) - stock_student).abs().max() <= 1e-5
    assert (one_step(family, klein, teacher, noise) - stock_teacher).abs().max() <= 1e-5
    assert (stock_student - stock_teacher).abs().max() > 1e-6  # the target is not ignored
    assert family.teacher_prompt(INSTRUCTION).endswith("as similar as the last reference image, based on the first "
                                                       "reference image and the editing instructions.")


def test_the_custom_pipeline_edits_as_the_stock_pipeline(tiny_models):
    from pipeline_dopsd import DOPSDPipeline

    ours = DOPSDPipeline.from_pretrained(str(tiny_models / "flux2-klein"), dtype=torch.float32)
    stock = load_stock(tiny_models / "flux2-klein")
    sources = [picture((200, 40, 40), (64, 80))]
    kwargs = dict(prompt=INSTRUCTION, image=sources, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                  output_type="np")
    expected = stock(**kwargs).images
    kwargs["generator"] = torch.Generator().manual_seed(3)
    got = ours(**kwargs).images
    assert got.shape == expected.shape == (1, 80, 64, 3)  # the output takes the first source's size, as in stock
    assert abs(got - expected).max() <= 1e-5
    preview = ours(prompt=INSTRUCTION, image=sources, reference_image=picture((0, 0, 250), (64, 80)), output_type="np",
                   generator=torch.Generator().manual_seed(3)).images
    assert abs(preview - expected).max() > 1e-4


def test_z_image_has_no_editing_path_and_the_trainer_says_so_before_loading(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="Z-Image-Turbo has no editing path"):
        family_class("ZImagePipeline", "edit")
    result = run_script("train_dopsd_lora.py", ["--pretrained_model_name_or_path", tiny_models / "z-image", "--task", "edit",
                                                "--instance_data_dir", EDITS, "--output_dir", tmp_path / "out"], check=False)
    assert result.returncode == 2 and "Z-Image-Turbo has no editing path" in result.stderr
    assert not (tmp_path / "out").exists()


def edit_args(folder, **overrides):
    base = dict(instance_data_dir=str(folder), dataset_name=None, caption_column=None, instance_prompt=None, task="edit")
    return argparse.Namespace(**{**base, **overrides})


def test_edit_rows_read_sources_in_order_in_both_layouts(tmp_path):
    for name in ["a", "b", "t"]:
        picture((9, 9, 9)).save(tmp_path / f"{name}.png")
    rows = [{"source_image": ["b.png", "a.png"], "file_name": "t.png", "text": "swap"},
            {"local_path_list": ["a.png", "t.png"], "short_en": "edit", "user_prompt_en": None}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = collect_raw_examples(edit_args(tmp_path, caption_column="text,short_en,user_prompt_en"))
    assert [[p.name for p in r.sources] for r in read] == [["b.png", "a.png"], ["a.png"]]
    assert [r.image.name for r in read] == ["t.png", "t.png"] and [r.captions for r in read] == [["swap"], ["edit"]]


BAD_EDIT_ROWS = {
    "no source": ({"file_name": "t.png", "text": "x"}, r"metadata\.jsonl:1 has no 'source_image'"),
    "missing source": ({"source_image": "gone.png", "file_name": "t.png", "text": "x"}, r":1: 'source_image' 'gone.png' does not exist"),
    "source outside": ({"source_image": "../t.png", "file_name": "t.png", "text": "x"}, r":1: .*outside the dataset folder"),
    "empty source list": ({"source_image": [], "file_name": "t.png", "text": "x"}, r":1: 'source_image' must be a path or a list"),
    "no target": ({"source_image": "s.png", "text": "x"}, r":1 has no 'file_name'"),
    "one path listed": ({"local_path_list": ["t.png"], "text": "x"}, r"'local_path_list' must list the source image\(s\) and then the target"),
    "no instruction": ({"source_image": "s.png", "file_name": "t.png"}, r"t\.png has no instruction: add a 'text' field"),
}


@pytest.mark.parametrize("case", list(BAD_EDIT_ROWS))
def test_bad_edit_rows_get_one_line(case, tmp_path):
    row, message = BAD_EDIT_ROWS[case]
    data = tmp_path / "data"
    data.mkdir()
    picture((9, 9, 9)).save(data / "t.png")
    picture((9, 9, 9)).save(data / "s.png")
    (data / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=message) as error:
        collect_raw_examples(edit_args(data))
    assert "\n" not in str(error.value)


def test_sources_outside_edit_mode_and_edits_without_metadata_are_refused(tmp_path):
    picture((9, 9, 9)).save(tmp_path / "t.png")
    with pytest.raises(UserError, match="--task edit reads its edits from .*metadata.jsonl"):
        collect_raw_examples(edit_args(tmp_path))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"source_image": "t.png", "file_name": "t.png", "text": "x"}) + "\n")
    with pytest.raises(UserError, match="names source images, which only an edit has: pass --task edit"):
        collect_raw_examples(edit_args(tmp_path, task="text-to-image"))


@pytest.mark.parametrize("small, named", [("s.png", "(source 1: s.png)"), ("t.png", "t.png")])
def test_an_image_under_klein_s_minimum_is_refused_before_loading(tiny_models, tmp_path, small, named):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("t.png", "s.png"):
        picture((9, 9, 9), (48, 48) if name == small else (64, 64)).save(data / name)
    (data / "metadata.jsonl").write_text(json.dumps({"source_image": "s.png", "file_name": "t.png", "text": "x"}) + "\n")
    result = run_script("train_dopsd_lora.py", ["--pretrained_model_name_or_path", tiny_models / "flux2-klein", "--task", "edit",
                                                "--instance_data_dir", data, "--output_dir", tmp_path / "out", "--resolution", 64],
                        check=False)
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{named}: 48x48 is smaller than" in last


def test_dataset_edit_rows_take_their_sources_from_the_source_columns():
    from dopsd_data import _dataset_rows

    args = argparse.Namespace(dataset_name="user/edits", instance_prompt=None, image_column="after")
    rows = [{"after": "T", "before": "S", "extra": ["X", "Y"], "text": "edit"},
            {"after": "T", "before": None, "extra": [], "text": "edit"}]
    read = _dataset_rows(args, rows, ["text"], ["before", "extra"])
    first = next(read)
    assert (first.image, first.sources, first.captions) == ("T", ("S", "X", "Y"), ["edit"])
    with pytest.raises(UserError, match=r"row 1 of user/edits has no source image in --source_image_column before,extra"):
        next(read)


def test_batches_never_mix_target_sizes_or_source_layouts():
    def example(size, *source_sizes):
        return Example(f"{size}{source_sizes}", picture((1, 2, 3), size), ["x"], [picture((3, 2, 1), s) for s in source_sizes] or None)

    examples = [example((64, 64), (64, 64)), example((64, 64), (64, 64)), example((64, 64), (64, 64), (64, 64)),
                example((64, 64), (80, 64)), example((80, 64), (64, 64)), example((64, 64))]
    batches = BucketBatches(examples, batch_size=2, seed=0)
    for _ in range(20):
        indices, _ = next(batches)
        assert len({examples[i].layout for i in indices}) == 1


def test_conditions_are_cached_by_instruction_and_sources():
    class Recording:
        def __init__(self):
            self.encoded = []

        def fit_caption(self, caption, teacher=True):
            return caption

        def encoders_for(self, kind):
            return []

        def encode_student(self, prompts, sources=None):
            self.encoded.append(("student", prompts[0], len(sources[0])))
            return [{"caption": torch.zeros(1)}]

        def encode_teacher(self, prompts, images, sources=None):
            self.encoded.append(("teacher", prompts[0], len(sources[0])))
            return [{"caption": torch.zeros(1)}]

    same_instruction = [Example("a", picture((1, 1, 1)), ["night"], [picture((5, 5, 5))]),
                        Example("b", picture((1, 1, 1)), ["night"], [picture((6, 6, 6))])]
    family, cache = Recording(), ConditionCache()
    cache.fill(family, same_instruction, "dopsd")
    assert sorted(family.encoded) == [("student", "night", 1)] * 2 + [("teacher", "night", 1)] * 2
    a, b = same_instruction
    assert cache.keys[("student", "night", a.source_digest)] != cache.keys[("student", "night", b.source_digest)]


def test_edit_lora_trains_through_accelerate_and_loads_in_the_stock_editing_pipeline(accelerate_config, tiny_models, tmp_path):
    out = tmp_path / "out"
    run_script("train_dopsd_lora.py", [
        "--pretrained_model_name_or_path", tiny_models / "flux2-klein", "--task", "edit", "--instance_data_dir", EDITS,
        "--caption_column", "text,short", "--output_dir", out, "--max_train_steps", 2, "--learning_rate", 1e-2,
        "--resolution", 64, "--rank", 4, "--lora_alpha", 4, "--validation_steps", 0, "--report_to", "none",
    ], launcher=["accelerate", "launch", "--config_file", str(accelerate_config)])
    card = (out / "README.md").read_text()
    assert "image-to-image" in card and 'image=[load_image("source.png")]' in card
    # The final grid: sources | base | student | teacher | target, the two-source row one column wider.
    grid = Image.open(out / "samples" / "step-000002.png")
    assert grid.size == (6 * 64, 4 * 2 * 64)

    source = Image.open(EDITS / "before" / "grass.png")

    def edit(pipe):
        return pipe(prompt=INSTRUCTION, image=[source], num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    base = edit(load_stock(tiny_models / "flux2-klein"))
    stock = load_stock(tiny_models / "flux2-klein")
    stock.load_lora_weights(str(out))
    tuned = edit(stock)
    assert abs(tuned - base).max() > 1e-5
    from pipeline_dopsd import DOPSDPipeline

    ours = DOPSDPipeline.from_pretrained(str(tiny_models / "flux2-klein"), dtype=torch.float32)
    ours.load_lora_weights(str(out))
    assert abs(edit(ours) - tuned).max() <= 1e-5


def test_sft_edit_baseline_regresses_the_target_under_the_editing_context(tiny_models, tmp_path):
    out = tmp_path / "sft"
    run_script("train_dopsd_lora.py", [
        "--pretrained_model_name_or_path", tiny_models / "flux2-klein", "--task", "edit", "--method", "sft",
        "--instance_data_dir", EDITS, "--output_dir", out, "--max_train_steps", 1, "--resolution", 64, "--rank", 4,
        "--lora_alpha", 4, "--validation_steps", 0, "--skip_final_validation", "--report_to", "none",
    ])
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((out / "args.json").read_text())["task"] == "edit"


def test_full_edit_fine_tune_saves_a_transformer_the_stock_editing_pipeline_runs(tiny_models, tmp_path):
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    out = tmp_path / "full"
    run_script("train_dopsd_full.py", [
        "--pretrained_model_name_or_path", tiny_models / "flux2-klein", "--task", "edit", "--instance_data_dir", EDITS,
        "--output_dir", out, "--max_train_steps", 2, "--learning_rate", 1e-3, "--ema_decay", 0.5, "--resolution", 64,
        "--validation_steps", 0, "--skip_final_validation", "--report_to", "none",
    ])
    card = (out / "README.md").read_text()
    assert "image-to-image" in card and f'image=[load_image("source.png")], prompt="{INSTRUCTION}"' in card
    source = Image.open(EDITS / "before" / "grass.png")

    def edit(pipe):
        return pipe(prompt=INSTRUCTION, image=[source], num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    tuned = Flux2KleinPipeline.from_pretrained(str(tiny_models / "flux2-klein"),
                                               transformer=Flux2Transformer2DModel.from_pretrained(out / "transformer"))
    assert abs(edit(tuned) - edit(load_stock(tiny_models / "flux2-klein"))).max() > 1e-5
