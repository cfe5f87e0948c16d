"""Production readiness: data handling, validation, checkpoints, model card and Hub, export formats, bad input."""

import argparse
import io
import json
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import load_stock
from dopsd_args import REFERENCE_BUCKETS, UserError
from dopsd_data import BucketBatches, Example, collect_raw_examples, load_examples, make_buckets, open_image
from dopsd_outputs import checkpoint_dirs, push_to_hub, resolve_resume, save_args, write_model_card
from dopsd_training import make_optimizer
from pipeline_dopsd import Flux2KleinFamily, ZImageFamily
from test_train_lora import FAST, run
from train_dopsd_lora import parse_args


def args_for(**overrides):
    base = dict(instance_data_dir=None, dataset_name=None, dataset_config_name=None, cache_dir=None, image_column="image",
                caption_column=None, instance_prompt=None, dataset_streaming=False, resolution=64, aspect_ratio_buckets=REFERENCE_BUCKETS,
                skip_bad_images=False)
    return argparse.Namespace(**{**base, **overrides})


def png(path, size=(64, 64), mode="RGB", color=None):
    Image.new(mode, size, color if color is not None else (10, 20, 30) if mode == "RGB" else 128).save(path)
    return path


# -- data --------------------------------------------------------------------------------------------------------------


def test_buckets_are_the_reference_set_scaled_to_the_resolution():
    buckets = make_buckets(args_for(resolution=1024))
    assert (1024, 1024) in buckets and (1152, 896) in buckets and (576, 1344) in buckets
    assert make_buckets(args_for(resolution=512)) == [(round(h / 32) * 16, round(w / 32) * 16) for h, w in buckets]
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in make_buckets(args_for(resolution=64)))


def test_one_bucket_per_batch_reshuffled_every_epoch_with_the_seed():
    images = [Image.new("RGB", (64, 64))] * 4 + [Image.new("RGB", (80, 48))] * 4
    examples = [Example(str(i), im, ["a", "b"]) for i, im in enumerate(images)]
    batches = BucketBatches(examples, batch_size=2, seed=3)
    first_epoch = [next(batches) for _ in range(4)]
    second_epoch = [next(batches) for _ in range(4)]
    for indices, column in first_epoch + second_epoch:
        assert len({examples[i].image.size for i in indices}) == 1 and column in (0, 1)
    assert sorted(i for b, _ in first_epoch for i in b) == list(range(8))
    assert first_epoch != second_epoch
    again = BucketBatches(examples, batch_size=2, seed=3)
    assert [next(again) for _ in range(4)] == first_epoch
    resumed = BucketBatches(examples, batch_size=2, seed=3)
    resumed.load_state_dict({"epoch": 1, "index": 2})
    assert [next(resumed) for _ in range(2)] == second_epoch[2:]


def test_image_modes_are_converted_and_exif_orientation_is_honoured(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert open_image(rgba, "x").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert open_image(Image.new("P", (8, 8)), "x").mode == "RGB"
    assert open_image(Image.new("L", (8, 8), 200), "x").getpixel((0, 0)) == (200, 200, 200)
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert open_image(sixteen, "x").getpixel((0, 0)) == (255, 255, 255)
    rotated = Image.new("RGB", (40, 20))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rotated.jpg"
    rotated.save(path, exif=exif)
    assert open_image(path, "rotated.jpg").size == (20, 40)


def test_folder_with_metadata_jsonl_and_several_caption_columns(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "sub.png", size=(96, 64))
    rows = [{"file_name": "a.png", "short": "[V] toy", "long": "a photo of [V] toy on a table"},
            {"file_name": "sub.png", "short": "[V] toy, wide"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    raw = collect_raw_examples(args_for(instance_data_dir=str(tmp_path), caption_column="short,long"))
    assert [row.captions for row in raw] == [["[V] toy", "a photo of [V] toy on a table"], ["[V] toy, wide"]]
    examples = load_examples(args_for(instance_data_dir=str(tmp_path)), raw, ZImageFamily)
    assert examples[1].image.size[0] > examples[1].image.size[1]  # the wide image went to a landscape bucket


@pytest.mark.parametrize("file_name", ["../outside.png", "/etc/passwd"])
def test_metadata_paths_must_stay_inside_the_dataset(tmp_path, file_name):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": file_name, "text": "x"}))
    with pytest.raises(UserError, match="outside the dataset folder"):
        collect_raw_examples(args_for(instance_data_dir=str(tmp_path)))


def test_local_imagefolder_through_datasets(tmp_path):
    for i in range(2):
        png(tmp_path / f"{i}.png", color=(i * 100, 0, 0))
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "caption": f"[V] {i}"}) for i in range(2)))
    for streaming in (False, True):
        raw = list(collect_raw_examples(args_for(dataset_name=str(tmp_path), caption_column="caption", dataset_streaming=streaming)))
        assert sorted(row.captions[0] for row in raw) == ["[V] 0", "[V] 1"]
        assert all(isinstance(row.image, Image.Image) for row in raw)


def test_bad_files_are_named_and_can_be_skipped(tmp_path, caplog):
    good = png(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("[V]")
    (tmp_path / "fake.png").write_text("not an image")
    truncated = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated, format="PNG")
    (tmp_path / "cut.png").write_bytes(truncated.getvalue()[:60])
    args = args_for(instance_data_dir=str(tmp_path), instance_prompt="[V]")
    raw = collect_raw_examples(args)
    with pytest.raises(UserError, match="cut.png"):
        load_examples(args, raw, ZImageFamily)
    args.skip_bad_images = True
    examples = load_examples(args, raw, ZImageFamily)
    assert [e.name for e in examples] == [str(good)]
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 2


def test_caption_problems_get_clear_messages(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"")
    with pytest.raises(UserError, match="a.txt is empty"):
        collect_raw_examples(args_for(instance_data_dir=str(tmp_path)))
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        collect_raw_examples(args_for(instance_data_dir=str(tmp_path)))
    (tmp_path / "a.txt").unlink()
    with pytest.raises(UserError, match="no caption"):
        collect_raw_examples(args_for(instance_data_dir=str(tmp_path)))


def test_argument_problems_are_caught_before_loading(tiny_models, sample_data, tmp_path):
    model = ["--pretrained_model_name_or_path", str(tiny_models / "z-image"), "--instance_data_dir", str(sample_data)]
    a_file = tmp_path / "file"
    a_file.write_text("")
    cases = {
        "is a file": ["--output_dir", str(a_file)],
        "exactly one of": ["--dataset_name", "x"],
        "leak the token": ["--report_to", "wandb", "--hub_token", "hf_x"],
        "FLUX.2-klein only": ["--teacher_prompt_suffix", "keep it"],
        "drop --method sft": ["--preview_teacher_only", "--method", "sft"],
        "between 1 and": ["--rollout_steps", "9"],
        "not writable": ["--output_dir", str(a_file / "below")],
    }
    for message, extra in cases.items():
        with pytest.raises(UserError, match=message):
            parse_args([*model, "--output_dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_family_defaults_apply_only_where_the_user_gave_no_value(tiny_models, sample_data, tmp_path, capsys):
    common = ["--instance_data_dir", str(sample_data), "--output_dir", str(tmp_path)]
    args, family = parse_args(["--pretrained_model_name_or_path", str(tiny_models / "flux2-klein"), *common])
    assert family is Flux2KleinFamily and (args.learning_rate, args.num_inference_steps, args.rollout_steps) == (2e-5, 4, 4)
    assert "--learning_rate 2e-05" in capsys.readouterr().out
    args, family = parse_args(["--pretrained_model_name_or_path", str(tiny_models / "z-image"), "--learning_rate", "3e-4", *common])
    assert family is ZImageFamily and (args.learning_rate, args.num_inference_steps, args.rollout_steps) == (3e-4, 8, 4)
    args, _ = parse_args(["--pretrained_model_name_or_path", str(tiny_models / "flux2-klein-base"), "--num_inference_steps", "8", *common])
    assert args.num_inference_steps == 8


# -- validation, checkpoints, logging ------------------------------------------------------------------------------------


def test_validation_does_not_change_training_and_writes_grids(tiny_models, sample_data, tmp_path):
    common = ["--pretrained_model_name_or_path", tiny_models / "flux2-klein", "--instance_data_dir", sample_data,
              "--max_train_steps", 3, "--learning_rate", 1e-2, "--checkpointing_steps", 3, *FAST]
    run([*common, "--output_dir", tmp_path / "plain"])
    common = [c for c in common if c not in ("--validation_steps", "0", "--skip_final_validation")]
    result = run([*common, "--output_dir", tmp_path / "validated", "--validation_steps", 1, "--num_validation_images", 1,
                  "--validation_prompt", "a photo of [V] toy", "--report_to", "tensorboard", "--quality_warn_ratio", 100])
    # The few-step quality statistic is logged at every validation, and a (here absurd) threshold warns.
    ratios = [json.loads(line) for line in (tmp_path / "validated" / "validation_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ratios] == [0, 1, 2, 3] and ratios[0]["sharpness_ratio"] == pytest.approx(1.0)
    assert "few-step quality is slipping" in result.stderr
    a = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "validated" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    samples = tmp_path / "validated" / "samples"
    grid = Image.open(samples / "step-000003.png")
    assert grid.size == (3 * 64, 64)  # base | student | teacher
    assert (samples / "rollout-step-000001.png").exists()
    assert list((tmp_path / "validated" / "logs").rglob("events.out.tfevents.*"))
    card = (tmp_path / "validated" / "README.md").read_text()
    assert "a photo of [V] toy" in card and "num_inference_steps=4" in card and "`[V]`" in card


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_models, sample_data, tmp_path):
    out = tmp_path / "out"
    result = run(["--pretrained_model_name_or_path", tiny_models / "z-image", "--teacher_vlm_name_or_path", tiny_models / "qwen3-vl-teacher",
                  "--teacher_min_pixels", 1024, "--teacher_max_pixels", 4096, "--instance_data_dir", sample_data,
                  "--output_dir", out, "--max_train_steps", 6, "--checkpointing_steps", 1, "--learning_rate", 1e30,
                  "--max_grad_norm", 1e30, *FAST], check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the loss is") and "at step" in last
    checkpoints = checkpoint_dirs(out)
    assert checkpoints and all((c / "training_state.json").exists() for c in checkpoints)
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_latest_ignores_a_half_written_checkpoint(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "training_state.json").write_text("{}")
    (tmp_path / ".partial-checkpoint-6").mkdir()  # a save killed half-way
    args = argparse.Namespace(resume_from_checkpoint="latest", output_dir=str(tmp_path))
    assert resolve_resume(args).name == "checkpoint-4"
    args.resume_from_checkpoint = str(tmp_path / ".partial-checkpoint-6")
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_resume(args)


# -- model card, Hub, export ---------------------------------------------------------------------------------------------


def card_args(base, **overrides):
    values = dict(hub_model_id=None, output_dir="out", pretrained_model_name_or_path=base, num_inference_steps=4, rank=8,
                  lora_alpha=8, method="dopsd", max_train_steps=10, learning_rate=1e-4, rollout_steps=4, ema_decay=0.9999,
                  loss_space="x0", instance_prompt="a photo of [V] dog", hub_token="hf_secret")
    return argparse.Namespace(**{**values, **overrides})


@pytest.mark.parametrize("base,license", [("black-forest-labs/FLUX.2-klein-4B", "apache-2.0"),
                                          ("black-forest-labs/FLUX.2-klein-9B", "other"),
                                          ("Tongyi-MAI/Z-Image-Turbo", "apache-2.0")])
def test_model_card_has_the_licence_snippets_and_widget(tmp_path, base, license):
    family = ZImageFamily if "Z-Image" in base else Flux2KleinFamily
    samples = [("a photo of [V] dog on a beach", Image.new("RGB", (8, 8)))]
    write_model_card(card_args(base, num_inference_steps=family.native_steps), family, tmp_path, samples, ["[V]"], "lora")
    card = (tmp_path / "README.md").read_text()
    assert f"license: {license}" in card and f"base_model: {base}" in card
    assert "image_0.png" in card and (tmp_path / "image_0.png").exists()
    assert f"num_inference_steps={family.native_steps}" in card and 'custom_pipeline="pipeline_dopsd.py"' in card
    assert "`[V]`" in card and "hf_secret" not in card and "lora" in card
    if license == "other":
        assert "flux-non-commercial-license" in card


def test_push_to_hub_uploads_the_output_without_checkpoints(tmp_path):
    with mock.patch("huggingface_hub.create_repo") as create, mock.patch("huggingface_hub.upload_folder") as upload:
        create.return_value.repo_id = "user/out"
        push_to_hub(card_args("Tongyi-MAI/Z-Image-Turbo", hub_model_id="user/out"), tmp_path)
    assert upload.call_args.kwargs["repo_id"] == "user/out"
    assert "checkpoint-*" in upload.call_args.kwargs["ignore_patterns"]


def test_saved_args_never_hold_the_token(tmp_path):
    save_args(card_args("Tongyi-MAI/Z-Image-Turbo"), tmp_path)
    assert "hf_secret" not in (tmp_path / "args.json").read_text()


def test_comfyui_export_round_trips_through_diffusers_loaders(tiny_models, sample_data, tmp_path):
    out = tmp_path / "out"
    run(["--pretrained_model_name_or_path", tiny_models / "flux2-klein", "--instance_data_dir", sample_data, "--output_dir", out,
         "--max_train_steps", 2, "--checkpointing_steps", 2, "--learning_rate", 1e-2, "--lora_format", "comfyui",
         "--lora_preset", "all", *FAST])
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert any(".img_attn.qkv." in k for k in keys) and any("single_blocks.1.linear1" in k for k in keys)
    outputs = {}
    # checkpoint-2 holds the same student in diffusers format.
    for name, lora in (("comfyui", out), ("diffusers", out / "checkpoint-2")):
        pipe = load_stock(tiny_models / "flux2-klein")
        pipe.load_lora_weights(str(lora))
        outputs[name] = pipe(prompt="a photo of [V] toy", num_inference_steps=4, height=64, width=64, output_type="np",
                             generator=torch.Generator().manual_seed(0)).images
    assert np.abs(outputs["diffusers"] - outputs["comfyui"]).max() <= 1e-5


def test_zimage_comfyui_keys_round_trip(zimage, tiny_models, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    transformer = zimage.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "w1"]), adapter_name="x")
    state = {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(transformer, adapter_name="x").items()}
    kwargs = dict(prompt="a cat", num_inference_steps=2, height=64, width=64, guidance_scale=0.0, output_type="np")
    trained = zimage(generator=torch.Generator().manual_seed(0), **kwargs).images
    comfy = ZImageFamily.comfyui_lora(state, 8 / 4)
    assert any(k.startswith("diffusion_model.layers.0.attention.to_q.lora_") for k in comfy)
    save_file(comfy, str(tmp_path / "lora.safetensors"))
    fresh = load_stock(tiny_models / "z-image")
    fresh.load_lora_weights(str(tmp_path / "lora.safetensors"))
    assert np.abs(fresh(generator=torch.Generator().manual_seed(0), **kwargs).images - trained).max() <= 1e-5


def _trained_lora(pipe, lora_format, **overrides):
    """A LoRA adaptation as the training script builds it, its student made non-trivial, alpha / rank = 7 / 4."""
    from accelerate import Accelerator

    from dopsd_engines import Engine
    from train_dopsd_lora import LoraAdaptation

    family = (ZImageFamily if type(pipe).__name__ == "ZImagePipeline" else Flux2KleinFamily)(pipe)
    args = argparse.Namespace(**{**dict(rank=4, lora_alpha=7, lora_dropout=0.0, lora_layers=None, lora_preset="all",
                                        method="sft", lora_format=lora_format, training_adapter=None), **overrides})
    pipe.transformer.requires_grad_(False)
    accelerator = Accelerator(cpu=True)
    adaptation = LoraAdaptation(args, family, pipe.transformer, accelerator, torch.float32)
    with torch.no_grad():
        for p in adaptation.student_params:
            p.copy_(torch.randn_like(p) * 0.1)
    adaptation.use_prepared(pipe.transformer, Engine(accelerator))
    return adaptation


def _student_deltas(adaptation):
    """delta W of every adapted module as the trainer applies it: (alpha / rank) B @ A, float64."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: layer.get_delta_weight("student").double() for name, layer in adaptation.transformer.named_modules()
            if isinstance(layer, BaseTunerLayer) and "student" in layer.lora_A}


@pytest.mark.parametrize("lora_format", ["diffusers", "comfyui"])
@pytest.mark.parametrize("family_dir", ["z-image", "flux2-klein"])
def test_every_lora_file_loads_at_its_trained_strength_in_diffusers_and_comfyui(tiny_models, tmp_path, family_dir, lora_format):
    from comfyui_rules import comfyui_deltas
    from peft.tuners.tuners_utils import BaseTunerLayer

    adaptation = _trained_lora(load_stock(tiny_models / family_dir), lora_format)
    expected = _student_deltas(adaptation)
    assert expected and all(d.abs().max() > 0 for d in expected.values())
    adaptation.save_final(tmp_path)
    state = load_file(tmp_path / "pytorch_lora_weights.safetensors")

    # diffusers: load_lora_weights then fuse_lora patches every adapted weight by exactly the trained delta.
    pipe = load_stock(tiny_models / family_dir)
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(tmp_path))
    loaded = {n for n, m in pipe.transformer.named_modules() if isinstance(m, BaseTunerLayer) and m.lora_A}
    assert loaded == set(expected)
    pipe.fuse_lora()
    fused = pipe.transformer.state_dict()
    for name, delta in expected.items():
        patched = fused[f"{name}.base_layer.weight"].double()
        torch.testing.assert_close(patched - original[f"{name}.weight"].double(), delta, atol=1e-6, rtol=1e-5)

    # ComfyUI: its key maps and alpha rule give the same delta W for every module, and every key is loaded.
    deltas, not_loaded = comfyui_deltas(state, family_dir)
    assert not not_loaded
    assert deltas.keys() == expected.keys()
    for name, delta in expected.items():
        torch.testing.assert_close(deltas[name], delta, atol=1e-6, rtol=1e-5)


def test_low_vram_options_explain_what_they_need(tiny_models, sample_data, tmp_path):
    import importlib.util

    common = ["--pretrained_model_name_or_path", str(tiny_models / "z-image"), "--instance_data_dir", str(sample_data),
              "--output_dir", str(tmp_path / "out")]
    bad_json = tmp_path / "bnb.json"
    bad_json.write_text("{not json")
    with pytest.raises(UserError, match="cannot read a JSON object"):
        parse_args([*common, "--bnb_quantization_config_path", str(bad_json)])
    if importlib.util.find_spec("bitsandbytes") is None:
        good_json = tmp_path / "nf4.json"
        good_json.write_text(json.dumps({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}))
        with pytest.raises(UserError, match="needs bitsandbytes"):
            parse_args([*common, "--bnb_quantization_config_path", str(good_json)])
        args, _ = parse_args([*common, "--use_8bit_adam"])
        with pytest.raises(UserError, match="needs bitsandbytes"):
            make_optimizer(args, [torch.nn.Parameter(torch.zeros(2))])
