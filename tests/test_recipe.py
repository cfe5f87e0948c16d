"""The recipe as the reference ran it: defaults, LoRA coverage, the reference's rollout grid, and the SFT baseline's
noise levels as diffusers' DreamBooth examples draw them."""

import argparse

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from dopsd_args import UserError
from dopsd_training import sample_sft_sigmas, training_rollout_sigmas
from pipeline_dopsd import Flux2KleinFamily, ZImageFamily
from train_dopsd_lora import parse_args, resolve_lora_targets

REFERENCE_SUFFIX = ("Make the main subject (facial/ip details), background, and overall composition consistent with the "
                    "reference image.")
# The reference's klein LoRA target list (flux2-klein_self-distill-edit/train_dopsd.py), as names to match.
REFERENCE_KLEIN_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_q",
                           "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


def _parse(tiny_models, sample_data, tmp_path, model, *extra):
    return parse_args(["--pretrained_model_name_or_path", str(tiny_models / model), "--instance_data_dir", str(sample_data),
                       "--output_dir", str(tmp_path / "out"), *extra])


def test_reference_recipe_is_the_default(tiny_models, sample_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args, _ = _parse(tiny_models, sample_data, tmp_path, "flux2-klein")
    assert (args.max_train_steps, args.gradient_accumulation_steps, args.train_batch_size) == (3001, 4, 1)
    assert (args.teacher_prompt_suffix, args.lora_preset, args.rollout_grid) == (REFERENCE_SUFFIX, "reference", "inference")
    printed = capsys.readouterr().out
    assert "effective batch: 4 samples per optimizer step" in printed and "--gradient_accumulation_steps 4" in printed
    args, _ = _parse(tiny_models, sample_data, tmp_path, "z-image")
    assert (args.max_train_steps, args.gradient_accumulation_steps, args.teacher_prompt_suffix) == (2000, 4, None)
    # Gradient accumulation makes up for the processes accelerate did not launch, and the user's values win.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _parse(tiny_models, sample_data, tmp_path, "z-image")[0].gradient_accumulation_steps == 2
    assert _parse(tiny_models, sample_data, tmp_path, "z-image", "--train_batch_size", "2")[0].gradient_accumulation_steps == 1
    args, _ = _parse(tiny_models, sample_data, tmp_path, "flux2-klein", "--gradient_accumulation_steps", "3", "--max_train_steps",
                     "7", "--teacher_prompt_suffix", "keep it")
    assert (args.gradient_accumulation_steps, args.max_train_steps, args.teacher_prompt_suffix) == (3, 7, "keep it")
    assert "effective batch: 6 samples per optimizer step" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # an argparse range error (tests/test_inputs.py checks the line)
        _parse(tiny_models, sample_data, tmp_path, "z-image", "--gradient_accumulation_steps", "0")


def test_klein_lora_presets(klein, zimage, tiny_models, sample_data, tmp_path):
    linears = [n for n, m in klein.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    # The reference's names through peft's suffix matching: what the paper's klein LoRAs adapted.
    adapted_by_reference = {n for n in linears if any(n.endswith("." + t) for t in REFERENCE_KLEIN_TARGETS)}
    reference = resolve_lora_targets(klein.transformer, list(Flux2KleinFamily.lora_presets["reference"]))
    assert set(reference) == adapted_by_reference
    assert all(n.startswith("transformer_blocks.") and ".attn." in n for n in reference) and len(reference) == 8
    every = set(resolve_lora_targets(klein.transformer, list(Flux2KleinFamily.lora_presets["all"])))
    assert every > set(reference)
    assert {"single_transformer_blocks.1.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out",
            "transformer_blocks.0.ff.linear_in", "transformer_blocks.0.ff_context.linear_out"} <= every
    assert ZImageFamily.lora_presets["reference"] == ZImageFamily.lora_presets["all"]
    resolve_lora_targets(zimage.transformer, list(ZImageFamily.lora_presets["reference"]))  # every name matches
    with pytest.raises(UserError, match="pass one of them"):
        _parse(tiny_models, sample_data, tmp_path, "flux2-klein", "--lora_preset", "all", "--lora_layers", "to_q")
    assert _parse(tiny_models, sample_data, tmp_path, "flux2-klein", "--lora_layers", "to_q")[0].lora_preset is None


def test_reference_rollout_grids(klein, zimage, tiny_models, sample_data, tmp_path):
    # 256 px on the tiny VAE is a 64x64-token image, like 1024 px on the real model.
    family = Flux2KleinFamily(klein)
    for steps in (2, 4):
        # The scheduler's own grid: linspace(1, 0.001) time-shifted with klein's empirical mu for these steps, then 0.
        mu = torch.tensor(compute_empirical_mu(4096, steps), dtype=torch.float64)
        unshifted = torch.linspace(1.0, 0.001, steps, dtype=torch.float64)
        expected = torch.exp(mu) / (torch.exp(mu) + (1 / unshifted - 1))
        reference = family.reference_rollout_sigmas(steps, 256, 256)
        torch.testing.assert_close(reference[:-1].double(), expected, atol=1e-5, rtol=0)
        assert reference[-1] == 0
    torch.testing.assert_close(reference, torch.tensor([1.0, 0.952, 0.832, 0.0098, 0.0]), atol=1e-3, rtol=0)
    args = argparse.Namespace(rollout_grid="inference", rollout_steps=4, num_inference_steps=4)
    inference = training_rollout_sigmas(family, args, 256, 256, "cpu")
    torch.testing.assert_close(inference, family.sigmas(4, 256, 256))
    assert inference[-2] > 0.7  # the inference states: the last one is far from clean
    assert torch.equal(training_rollout_sigmas(family, argparse.Namespace(**{**vars(args), "rollout_grid": "reference"}), 256, 256, "cpu"),
                       reference)
    # Z-Image-Turbo's reference grid {1, .9, .75, .5} -> 0 is the inference grid's every other point.
    zimage_family = ZImageFamily(zimage)
    torch.testing.assert_close(zimage_family.reference_rollout_sigmas(4, 1024, 1024), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]),
                               atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="4 states only"):
        _parse(tiny_models, sample_data, tmp_path, "z-image", "--rollout_grid", "reference", "--rollout_steps", "3")
    assert _parse(tiny_models, sample_data, tmp_path, "flux2-klein", "--rollout_grid", "reference")[0].rollout_grid == "reference"


@pytest.mark.parametrize("family_name", ["zimage", "klein"])
def test_sft_noise_levels_are_drawn_as_diffusers_dreambooth_examples_draw_them(family_name, request):
    """train_dreambooth_lora_{z_image,flux2_klein}.py: u ~ U[0, 1), sigma = a fresh scheduler's sigmas[int(u * 1000)]:
    Z-Image-Turbo's shift 3, klein unshifted (its dynamic shift is applied only at inference), at any size."""
    pipe = request.getfixturevalue(family_name)
    family = (ZImageFamily if family_name == "zimage" else Flux2KleinFamily)(pipe)
    draws = 20000
    sigmas = sample_sft_sigmas(family, draws, 256, 256, torch.Generator().manual_seed(0), "cpu")
    u = torch.rand(draws, generator=torch.Generator().manual_seed(0))
    table = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config).sigmas
    assert torch.equal(sigmas, table[(u * 1000).long()])
    assert torch.equal(sample_sft_sigmas(family, draws, 64, 64, torch.Generator().manual_seed(0), "cpu"), sigmas)
    t = torch.arange(1000, 0, -1) / 1000  # the examples' unshifted grid 1 ... 0.001
    shift = 3.0 if family_name == "zimage" else 1.0
    torch.testing.assert_close(table, shift * t / (1 + (shift - 1) * t))
    below = (sigmas < 0.1).float().mean().item()
    # Uniform: 10 % below 0.1, median 0.5; shift 3: 3.6 % below 0.1, median 0.75.
    expected_below, expected_median = (0.036, 0.75) if family_name == "zimage" else (0.10, 0.5)
    assert below == pytest.approx(expected_below, abs=0.01)
    assert sigmas.median().item() == pytest.approx(expected_median, abs=0.02)
