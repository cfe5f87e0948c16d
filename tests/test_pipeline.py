"""pipeline_dopsd.py as a community pipeline: loading, parity with the stock pipelines, LoRA, teacher preview."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from conftest import REPO, load_stock

PROMPT = "a photo of [V] toy on a table"


def custom(path):
    return DiffusionPipeline.from_pretrained(str(path), custom_pipeline=str(REPO / "pipeline_dopsd.py"), trust_remote_code=True)


def generate(pipe, **kwargs):
    kwargs.setdefault("height", 64)
    kwargs.setdefault("width", 64)
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def stock_generate(pipe, steps, **kwargs):
    extra = {"guidance_scale": 0.0} if type(pipe).__name__ == "ZImagePipeline" else {}
    return generate(pipe, num_inference_steps=steps, **extra, **kwargs)


def random_lora(pipe, directory):
    """A LoRA with non-zero weights, saved in diffusers format as a training run would."""
    transformer = pipe.transformer
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"])
    torch.manual_seed(1)
    transformer.add_adapter(config, adapter_name="made")
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    type(pipe).save_lora_weights(str(directory), transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="made"),
                                 transformer_lora_adapter_metadata=config.to_dict())
    transformer.delete_adapters("made")
    return directory


@pytest.mark.parametrize("name,steps", [("z-image", 8), ("flux2-klein", 4)])
def test_custom_pipeline_loads_and_matches_the_stock_pipeline(tiny_models, name, steps):
    pipe = custom(tiny_models / name)
    assert type(pipe).__name__ == "DOPSDPipeline"
    assert pipe.family.native_steps == steps
    ours = generate(pipe)  # the family's native step count by default
    stock = stock_generate(load_stock(tiny_models / name), steps)
    assert ours.shape == stock.shape == (1, 64, 64, 3)
    assert np.abs(ours - stock).max() <= 1e-5


@pytest.mark.parametrize("name", ["z-image", "flux2-klein"])
def test_lora_loading_scales_and_fusing_work_as_on_the_stock_pipeline(tiny_models, tmp_path, name):
    lora = random_lora(load_stock(tiny_models / name), tmp_path / "lora")
    base = generate(custom(tiny_models / name))

    pipe = custom(tiny_models / name)
    pipe.load_lora_weights(str(lora), adapter_name="concept")
    tuned = generate(pipe)
    stock = load_stock(tiny_models / name)
    stock.load_lora_weights(str(lora), adapter_name="concept")
    assert np.abs(tuned - stock_generate(stock, pipe.family.native_steps)).max() <= 1e-5
    assert np.abs(tuned - base).max() > 1e-4

    pipe.set_adapters(["concept"], adapter_weights=[0.0])
    assert np.abs(generate(pipe) - base).max() <= 1e-5
    pipe.set_adapters(["concept"], adapter_weights=[1.0])
    pipe.fuse_lora()
    assert np.abs(generate(pipe) - tuned).max() <= 1e-4


def test_zimage_teacher_preview(tiny_models):
    pipe = custom(tiny_models / "z-image")
    reference = Image.new("RGB", (64, 64), (230, 120, 20))
    with pytest.raises(RuntimeError, match="load_teacher_encoder"):
        generate(pipe, reference_image=reference)
    pipe.load_teacher_encoder(str(tiny_models / "qwen3-vl-teacher"), min_pixels=32 * 32, max_pixels=64 * 64)
    preview = generate(pipe, reference_image=reference, height=64, width=96)
    assert preview.shape == (1, 64, 96, 3)
    assert np.abs(preview - generate(pipe, height=64, width=96)).max() > 1e-4


def test_klein_teacher_preview_uses_the_editing_path(tiny_models):
    pipe = custom(tiny_models / "flux2-klein")
    reference = Image.new("RGB", (96, 64), (20, 200, 120))
    preview = generate(pipe, reference_image=reference, height=None, width=None)
    assert preview.shape == (1, 64, 96, 3)  # like the stock editing path, the size defaults to the reference's
    text_only = generate(pipe, height=64, width=96)
    assert np.abs(preview - text_only).max() > 1e-5
    stock = load_stock(tiny_models / "flux2-klein")
    expected = stock(prompt=f"{PROMPT} {pipe.family.teacher_prompt_suffix}", image=reference, num_inference_steps=4,
                     generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.abs(preview - expected).max() <= 1e-5


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": None}, "prompt must be a string"),
    ({"prompt": []}, "prompt must be a string"),
    ({"prompt": ["a", 3]}, "prompt must be a string"),
    ({"num_inference_steps": 0}, "num_inference_steps must be at least 1, got 0"),
])
def test_a_bad_call_is_one_clear_error_not_a_silent_default(tiny_models, kwargs, message):
    pipe = custom(tiny_models / "flux2-klein")
    with pytest.raises(ValueError, match=message):
        pipe(**{"prompt": PROMPT, "height": 64, "width": 64, **kwargs})
    assert generate(pipe, num_inference_steps=1).shape == (1, 64, 64, 3)  # one step is a valid count
