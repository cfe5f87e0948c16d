"""--method sft --training_adapter: the baseline practitioners use on turbo models (a frozen LoRA active only while
training). It must change the training forward, be absent from the saved LoRA, and never reach validation or inference."""

import json

import numpy as np

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from conftest import load_stock
from dopsd_args import UserError
from pipeline_dopsd import ZImageFamily
from test_production import _trained_lora
from test_train_lora import FAST, run
from train_dopsd_lora import parse_args, resolve_training_adapter

# Adapter modules: some the student also adapts, one (a feed-forward / single-stream layer) it does not.
ADAPTER_TARGETS = {"z-image": ["to_q", "to_v", "w2"], "flux2-klein": ["to_q", "add_k_proj", "to_qkv_mlp_proj"]}


def write_adapter(tiny_models, family_dir, folder, seed=1):
    """A random diffusers-format LoRA for the tiny model, written as diffusers writes one (alpha != rank)."""
    pipe = load_stock(tiny_models / family_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=ADAPTER_TARGETS[family_dir])
    pipe.transformer.add_adapter(config, adapter_name="adapter")
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if ".adapter." in name:
                p.copy_(torch.randn_like(p) * 0.2)
    state = get_peft_model_state_dict(pipe.transformer, adapter_name="adapter")
    type(pipe).save_lora_weights(folder, transformer_lora_layers=state, transformer_lora_adapter_metadata=config.to_dict(),
                                 weight_name="adapter.safetensors")
    return folder / "adapter.safetensors"


def velocity(family, transformer, seed=0):
    condition = family.collate(family.encode_student(["a photo of [V] toy"]), "cpu")
    noise = family.initial_noise(1, 64, 64, torch.Generator().manual_seed(seed))
    sigma = family.sigmas(family.native_steps, 64, 64)[1]
    return family.velocity(transformer, noise, sigma, condition, dtype=torch.float32)


@pytest.mark.parametrize("family_dir", ["z-image", "flux2-klein"])
@torch.no_grad()
def test_the_training_adapter_runs_in_training_only_and_never_reaches_the_saved_lora(tiny_models, tmp_path, family_dir):
    adapter_file = write_adapter(tiny_models, family_dir, tmp_path / "adapter")
    pipe = load_stock(tiny_models / family_dir)
    adaptation = _trained_lora(pipe, "diffusers", training_adapter=str(adapter_file),
                               training_adapter_source=(str(adapter_file.parent), adapter_file.name))
    family, transformer = adaptation.family, adaptation.transformer
    with adaptation.training():
        trained_forward = velocity(family, transformer)
    with adaptation.student():
        deployed = velocity(family, transformer)
    with adaptation.base():
        base = velocity(family, transformer)
    assert (trained_forward - deployed).abs().max() > 1e-4  # the adapter changes the training forward

    adaptation.save_final(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    plain = _trained_lora(load_stock(tiny_models / family_dir), "diffusers")
    plain.save_final(tmp_path / "plain")
    assert saved.keys() == load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors").keys()
    assert not any("training_adapter" in k for k in saved)

    # Stock pipelines: the saved file alone is the deployed student; with the adapter added at weight 1 (diffusers'
    # own combination of adapters), the training forward; no adapter, the base column.
    stock = load_stock(tiny_models / family_dir)
    torch.testing.assert_close(velocity(family, stock.transformer), base, atol=1e-6, rtol=1e-5)
    stock.load_lora_weights(str(tmp_path / "out"), adapter_name="student")
    torch.testing.assert_close(velocity(family, stock.transformer), deployed, atol=1e-6, rtol=1e-5)
    stock.load_lora_weights(str(adapter_file), adapter_name="adapter")
    stock.set_adapters(["student", "adapter"], [1.0, 1.0])
    torch.testing.assert_close(velocity(family, stock.transformer), trained_forward, atol=1e-6, rtol=1e-5)


def test_the_training_adapter_takes_no_gradient_and_stays_out_of_the_optimizer(tiny_models, tmp_path):
    adapter_file = write_adapter(tiny_models, "flux2-klein", tmp_path / "adapter")
    adaptation = _trained_lora(load_stock(tiny_models / "flux2-klein"), "diffusers", training_adapter=str(adapter_file),
                               training_adapter_source=(str(adapter_file.parent), adapter_file.name))
    adaptation.transformer.enable_gradient_checkpointing()  # backward recomputes: the adapter must still be active
    with adaptation.training():
        velocity(adaptation.family, adaptation.transformer).square().mean().backward()
    assert adaptation.training_adapter_params and all(p.grad is None and not p.requires_grad
                                                      for p in adaptation.training_adapter_params)
    assert all(p.grad is not None for p in adaptation.student_params)
    ids = {id(p) for p in adaptation.trainable_parameters()}
    assert not ids & {id(p) for p in adaptation.training_adapter_params}


def test_sft_with_a_training_adapter_end_to_end(tiny_models, sample_data, tmp_path):
    adapter_file = write_adapter(tiny_models, "z-image", tmp_path / "adapter")
    out = tmp_path / "out"
    result = run(["--pretrained_model_name_or_path", tiny_models / "z-image", "--instance_data_dir", sample_data,
                  "--output_dir", out, "--method", "sft", "--training_adapter", adapter_file, "--max_train_steps", 2,
                  "--checkpointing_steps", 2, *FAST])
    assert "training adapter" in result.stdout + result.stderr
    # Only the student's modules (the reference preset's), in diffusers' keys; nothing of the adapter.
    preset = ZImageFamily.lora_presets["reference"]
    for weights in (load_file(out / "pytorch_lora_weights.safetensors"),
                    load_file(out / "checkpoint-2" / "pytorch_lora_weights.safetensors")):
        modules = {k.removeprefix("transformer.").split(".lora_")[0] for k in weights}
        assert all(k.startswith("transformer.") and "training_adapter" not in k for k in weights)
        assert modules and all(m.endswith(preset) for m in modules)
    assert json.loads((out / "args.json").read_text())["training_adapter"] == str(adapter_file)
    # The adapter is in the training forward: the same run without it (same seed, data and noise) learns another student.
    run(["--pretrained_model_name_or_path", tiny_models / "z-image", "--instance_data_dir", sample_data,
         "--output_dir", tmp_path / "plain", "--method", "sft", "--max_train_steps", 2, *FAST])
    plain = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    final = load_file(out / "pytorch_lora_weights.safetensors")
    assert plain.keys() == final.keys()
    assert max((plain[k] - final[k]).abs().max().item() for k in plain if ".lora_B." in k) > 0


def test_training_adapter_problems_are_one_line_before_loading(tiny_models, sample_data, tmp_path):
    common = ["--pretrained_model_name_or_path", str(tiny_models / "z-image"), "--instance_data_dir", str(sample_data),
              "--output_dir", str(tmp_path / "out")]
    adapter_file = write_adapter(tiny_models, "z-image", tmp_path / "adapter")
    with pytest.raises(UserError, match="for the --method sft baseline"):
        parse_args([*common, "--training_adapter", str(adapter_file)])
    args, _ = parse_args([*common, "--method", "sft", "--training_adapter", str(adapter_file.parent)])
    assert args.training_adapter_source == (str(adapter_file.parent), "adapter.safetensors")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for spec, message in [(tmp_path / "missing.safetensors", "no such file or folder"), ("./nothing", "no such file"),
                          (tmp_path / "empty", "holds no .safetensors"), (tmp_path / "junk.safetensors", "not a readable safetensors")]:
        with pytest.raises(UserError, match=message):
            resolve_training_adapter(str(spec), "sft")
    # Hub ids cannot be checked offline: they pass, with the file's path in the repo when given.
    assert resolve_training_adapter("ostris/zimage_turbo_training_adapter", "sft") == ("ostris/zimage_turbo_training_adapter", None)
    assert resolve_training_adapter("ostris/zimage_turbo_training_adapter/v2.safetensors", "sft") == (
        "ostris/zimage_turbo_training_adapter", "v2.safetensors")


def test_a_training_adapter_for_another_model_is_refused(tiny_models, tmp_path):
    adapter_file = write_adapter(tiny_models, "z-image", tmp_path / "adapter")
    with pytest.raises(UserError, match="training_adapter"):
        _trained_lora(load_stock(tiny_models / "flux2-klein"), "diffusers", training_adapter=str(adapter_file),
                      training_adapter_source=(str(adapter_file.parent), adapter_file.name))


@torch.no_grad()
def test_validation_samples_the_deployed_student_without_the_adapter(tiny_models, tmp_path):
    """sample_grid's student column is the student alone (what the saved LoRA gives), not the training forward."""
    import argparse
    from types import SimpleNamespace

    from PIL import Image

    from dopsd_data import Example
    from dopsd_outputs import validation_generator
    from dopsd_validation import sample_grid

    adapter_file = write_adapter(tiny_models, "z-image", tmp_path / "adapter")
    adaptation = _trained_lora(load_stock(tiny_models / "z-image"), "diffusers", training_adapter=str(adapter_file),
                               training_adapter_source=(str(adapter_file.parent), adapter_file.name))
    family, prompt = adaptation.family, "a photo of [V] toy"
    condition = family.encode_student([prompt])[0]
    run_like = SimpleNamespace(
        args=argparse.Namespace(output_dir=str(tmp_path / "out"), num_inference_steps=2, num_validation_images=1, seed=0),
        family=family, rows=[Example("row", Image.new("RGB", (64, 64)), [prompt])],
        conditions=SimpleNamespace(student=lambda p, example: condition),
        adaptation=adaptation, transformer=adaptation.transformer, device="cpu", validation_teacher=[])
    row, = sample_grid(run_like)
    base, student = row.base, row.student

    def sample(context):
        noise = family.initial_noise(1, 64, 64, validation_generator(prompt, 0, 0))
        with context():
            x = family.sample(adaptation.transformer, family.collate([condition], "cpu"), noise, family.sigmas(2, 64, 64))
        return np.asarray(family.decode(x)[0])

    assert np.array_equal(np.asarray(student), sample(adaptation.student))
    assert not np.array_equal(np.asarray(student), sample(adaptation.training))
    assert np.array_equal(np.asarray(base), sample(adaptation.base))
