"""train_dopsd_full.py: full fine-tuning with an EMA weight-copy teacher, resume, two ranks, engine configs."""

import argparse
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, load_stock, run_script
from dopsd_training import rollout_sigmas
from pipeline_dopsd import Flux2KleinFamily

FAST = ["--resolution", "64", "--validation_steps", "0", "--skip_final_validation", "--report_to", "none"]


def run(args, launcher=None, check=True):
    return run_script("train_dopsd_full.py", args, launcher, check)


def klein_args(data, out, *extra):
    return ["--pretrained_model_name_or_path", data[0], "--instance_data_dir", data[1], "--output_dir", out,
            "--learning_rate", 1e-3, "--ema_decay", 0.5, *FAST, *extra]


@pytest.fixture
def data(tiny_models, sample_data):
    return tiny_models / "flux2-klein", sample_data


def test_full_fine_tuning_end_to_end(data, tmp_path, tiny_models):
    out = tmp_path / "out"
    run(klein_args(data, out, "--max_train_steps", 3, "--checkpointing_steps", 3, "--condition_cache_dir", tmp_path / "cache"))
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel.from_pretrained(out / "transformer")
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_models / "flux2-klein"), transformer=transformer)
    tuned = pipe(prompt="a photo of [V] toy", num_inference_steps=4, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    base = load_stock(tiny_models / "flux2-klein")(prompt="a photo of [V] toy", num_inference_steps=4, height=64, width=64,
                                                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert abs(tuned - base).max() > 1e-5
    teacher = load_file(out / "checkpoint-3" / "teacher" / "diffusion_pytorch_model.safetensors")
    student = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    start = load_file(tiny_models / "flux2-klein" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 for v in teacher.values())
    # EMA 0.5 over 3 steps: the teacher sits strictly between the start and the student for a trained weight.
    key = "transformer_blocks.0.attn.to_q.weight"
    moved, taught = (student[key] - start[key]).abs().sum(), (teacher[key] - start[key]).abs().sum()
    assert 0 < taught < moved
    # The condition cache is reused: a second run computes nothing new.
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    run(klein_args(data, tmp_path / "again", "--max_train_steps", 1, "--condition_cache_dir", tmp_path / "cache"))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == files


def test_resume_equals_an_uninterrupted_run(data, tmp_path):
    run(klein_args(data, tmp_path / "straight", "--max_train_steps", 4, "--checkpointing_steps", 2))
    run(klein_args(data, tmp_path / "resumed", "--max_train_steps", 4, "--checkpointing_steps", 2,
                   "--resume_from_checkpoint", tmp_path / "straight" / "checkpoint-2"))
    for name in ("model.safetensors", "teacher/diffusion_pytorch_model.safetensors"):
        a = load_file(tmp_path / "straight" / "checkpoint-4" / name)
        b = load_file(tmp_path / "resumed" / "checkpoint-4" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_two_ranks_end_identical_with_one_output(data, tmp_path):
    out = tmp_path / "out"
    result = run(klein_args(data, out, "--max_train_steps", 3, "--checkpointing_steps", 3),
                 launcher=["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no"])
    assert "student and teacher identical on all 2 ranks" in result.stderr
    assert sorted(p.name for p in (out / "transformer").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    state = json.loads((out / "checkpoint-3" / "training_state.json").read_text())
    assert len(state["batches"]) == 2 and len(state["noise_generator"]) == 2
    assert len((out / "loss_log.jsonl").read_text().splitlines()) == 3  # one log, written by the main process


def test_teacher_is_a_frozen_copy_that_follows_the_student_by_ema(klein):
    from accelerate import Accelerator
    from dopsd_engines import engine_for
    from train_dopsd_full import FullAdaptation

    args = argparse.Namespace(method="dopsd", ema_dtype="fp32", ema_device="accelerator", ema_decay=0.75, learning_rate=1e-2,
                              adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8, use_8bit_adam=False)
    family = Flux2KleinFamily(klein)
    accelerator = Accelerator(cpu=True)
    adaptation = FullAdaptation(args, family, klein.transformer, accelerator, torch.float32)
    adaptation.use_prepared(klein.transformer, engine_for(accelerator))
    assert not any(p.requires_grad for p in adaptation.teacher.parameters())
    condition = family.collate(family.encode_student(["a cat"]), "cpu")
    noise = family.initial_noise(1, 64, 64, torch.Generator().manual_seed(0))
    sigma = rollout_sigmas(family.sigmas(4, 64, 64), 4)[1]
    loss = (adaptation.student_velocity(klein.transformer, noise, sigma, condition) - adaptation.teacher_velocity(noise, sigma, condition).detach()).square().mean()
    loss.backward()
    assert all(p.grad is None for p in adaptation.teacher.parameters())
    before = [p.detach().clone() for p in adaptation.teacher.parameters()]
    with torch.no_grad():
        for p in klein.transformer.parameters():
            p.add_(1.0)
    adaptation.update_teacher()
    for b, t, s in zip(before, adaptation.teacher.parameters(), klein.transformer.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)


@pytest.mark.parametrize("name", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp_z_image", "fsdp_flux2_klein"])
def test_engine_configs_are_valid_accelerate_configs(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "configs" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert config.mixed_precision == "bf16" and config.num_processes >= 2
    if name.startswith("deepspeed"):
        assert config.distributed_type == "DEEPSPEED" and raw["deepspeed_config"]["zero_stage"] == int(name[-1])
    if name.startswith("fsdp"):
        import diffusers.models.transformers.transformer_flux2 as flux2
        import diffusers.models.transformers.transformer_z_image as z_image

        module = z_image if "z_image" in name else flux2
        classes = raw["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
        assert config.distributed_type == "FSDP" and all(hasattr(module, c) for c in classes)
