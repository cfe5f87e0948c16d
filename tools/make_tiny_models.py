"""Build tiny, random, offline copies of the models D-OPSD works with.

The real checkpoints (Z-Image-Turbo, FLUX.2-klein, Qwen3-VL) are gigabytes and live on a model hub that tests
and CI cannot reach. This script builds structurally faithful stand-ins from configs alone, with fixed seeds, and
saves them with ``save_pretrained`` so that the ordinary ``from_pretrained`` loading code is what gets tested:

    tiny_models/z-image/           ZImagePipeline (Qwen3Model text encoder)
    tiny_models/flux2-klein/       Flux2KleinPipeline, is_distilled=True
    tiny_models/flux2-klein-base/  the same weights, is_distilled=False
    tiny_models/qwen3-vl-teacher/  Qwen3VLForConditionalGeneration + Qwen3VLProcessor
    tiny_models/.complete          written last, so an interrupted build is never mistaken for a finished one

Usage: ``python tools/make_tiny_models.py [--output_dir tiny_models] [--force]``, or
``from make_tiny_models import build_tiny_models``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from PIL import Image
from tokenizers.pre_tokenizers import ByteLevel

SEED = 0
COMPLETE_MARKER = ".complete"
MODEL_DIRS = ("z-image", "flux2-klein", "flux2-klein-base", "qwen3-vl-teacher")

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
]

# A cut-down Qwen3 / Qwen3-VL template. It keeps the two behaviours the pipelines rely on: Z-Image passes
# enable_thinking=True (no think block), klein passes enable_thinking=False (an empty think block is appended).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# Text-model sizes shared by the Z-Image text encoder and the Qwen3-VL language model, so that the VL teacher
# can take the Z-Image text encoder's weights unchanged (as D-OPSD does with the real Qwen3-4B / Qwen3-VL-4B).
TEXT_KWARGS = dict(
    hidden_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    intermediate_size=64,
    max_position_embeddings=2048,
)
ROPE_THETA = 1e6


def build_tokenizer():
    """Return a byte-level ``Qwen2Tokenizer`` (no merges) with the Qwen special tokens and chat template."""
    from transformers import Qwen2Tokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + SPECIAL_TOKENS)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token=None,
    )
    # Registering them as special keeps e.g. "<|image_pad|>" one token instead of 13 bytes.
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == len(vocab), "special tokens must reuse the vocab ids, not append new ones"
    return tokenizer


def qwen3_config(tokenizer, num_hidden_layers: int):
    """Return the small ``Qwen3Config`` used by both text encoders."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        num_hidden_layers=num_hidden_layers,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **TEXT_KWARGS,
    )


def fill_zero_parameters(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Give every all-zero parameter of ``module`` small random values.

    diffusers zero-initialises some parameters (in 0.42.1 Z-Image's x_pad_token/cap_pad_token; in other versions
    adaLN-zero gates or final projections). A zero tensor is a special case that can hide bugs (a zero final
    layer makes every output 0, so every test of it would pass trivially); random values keep inputs visible.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)


def build_zimage(tokenizer):
    """Return a tiny random ``ZImagePipeline``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    torch.manual_seed(SEED)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=TEXT_KWARGS["hidden_size"],
        rope_theta=256,
        t_scale=1000,
        axes_dims=[8, 4, 4],
        axes_lens=[1024, 64, 64],
    )
    fill_zero_parameters(transformer, seed=SEED + 1)
    torch.manual_seed(SEED + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(SEED + 3)
    text_encoder = Qwen3Model(qwen3_config(tokenizer, num_hidden_layers=2))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def build_klein(tokenizer, is_distilled: bool):
    """Return a tiny random ``Flux2KleinPipeline``; the weights do not depend on ``is_distilled``."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3ForCausalLM

    # 28 layers so that the pipeline's default text_encoder_out_layers=(9, 18, 27) exist.
    text_layers = 28
    out_layers = 3

    torch.manual_seed(SEED + 10)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=out_layers * TEXT_KWARGS["hidden_size"],
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        guidance_embeds=False,
    )
    fill_zero_parameters(transformer, seed=SEED + 11)
    torch.manual_seed(SEED + 12)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # The pipeline normalises latents with the BN running statistics; identity statistics would hide bugs
    # such as a missing or doubled normalisation.
    generator = torch.Generator().manual_seed(SEED + 13)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=generator) * 0.1)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=generator) + 0.5)
    torch.manual_seed(SEED + 14)
    text_encoder = Qwen3ForCausalLM(qwen3_config(tokenizer, num_hidden_layers=text_layers))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )


def build_qwen3_vl(tokenizer, zimage_text_encoder):
    """Return a tiny ``(Qwen3VLForConditionalGeneration, Qwen3VLProcessor)`` whose LM is the Z-Image text encoder."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    token_ids = dict(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    text_config = dict(
        vocab_size=len(tokenizer),
        num_hidden_layers=zimage_text_encoder.config.num_hidden_layers,
        # mrope_section must sum to head_dim / 2.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": ROPE_THETA,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_KWARGS,
    )
    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=TEXT_KWARGS["hidden_size"],
        num_position_embeddings=64,  # must be a perfect square (a 2-D grid of learned positions)
        deepstack_visual_indexes=[0],
    )
    torch.manual_seed(SEED + 20)
    model = Qwen3VLForConditionalGeneration(
        Qwen3VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False, **token_ids)
    )
    result = model.model.language_model.load_state_dict(zimage_text_encoder.state_dict())
    assert not result.missing_keys and not result.unexpected_keys, result

    # Real Qwen3-VL normalises with mean/std 0.5. The pixel budget (in pixels) is kept small so that a
    # teacher caption of image tokens stays far below the tiny Z-Image's 1024 caption positions.
    vision_kwargs = dict(
        size={"shortest_edge": 32 * 32, "longest_edge": 256 * 256},
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**vision_kwargs),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**vision_kwargs),
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


@torch.no_grad()
def check_zimage_caption_sensitivity(pipe) -> None:
    """Fail loudly if the Z-Image transformer ignores its caption (e.g. zero-initialised output layers)."""
    generator = torch.Generator().manual_seed(SEED)
    x = [torch.randn(16, 1, 8, 8, generator=generator)]
    t = torch.tensor([0.5])
    cap_a = [torch.randn(7, TEXT_KWARGS["hidden_size"], generator=generator)]
    cap_b = [torch.randn(7, TEXT_KWARGS["hidden_size"], generator=generator)]
    out_a = pipe.transformer(x, t, cap_a, return_dict=False)[0][0]
    out_b = pipe.transformer(x, t, cap_b, return_dict=False)[0][0]
    assert out_a.abs().max() > 0, "tiny Z-Image transformer outputs zeros"
    assert not torch.allclose(out_a, out_b), "tiny Z-Image transformer ignores its caption"


@torch.no_grad()
def check_klein_caption_sensitivity(pipe) -> None:
    """Fail loudly if the klein transformer ignores its text tokens."""
    generator = torch.Generator().manual_seed(SEED)
    tr = pipe.transformer
    joint_dim = tr.config.joint_attention_dim
    img = torch.randn(1, 16, tr.config.in_channels, generator=generator)
    # Position ids (t, h, w, l): a 4x4 latent grid and 5 text tokens along l, as the pipeline lays them out.
    img_ids = torch.cartesian_prod(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), torch.zeros(1))[None]
    txt_ids = torch.zeros(1, 5, 4)
    txt_ids[..., 3] = torch.arange(5)
    outs = [
        tr(img, torch.randn(1, 5, joint_dim, generator=generator), torch.tensor([0.5]), img_ids, txt_ids,
           return_dict=False)[0]
        for _ in range(2)
    ]
    assert outs[0].abs().max() > 0, "tiny klein transformer outputs zeros"
    assert not torch.allclose(outs[0], outs[1]), "tiny klein transformer ignores its text tokens"


@torch.no_grad()
def check_qwen3_vl(model, processor) -> None:
    """Run the VL teacher on one image + text message, as D-OPSD does, and check the feature shape."""
    messages = [{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (64, 64), (200, 40, 40))},
        {"type": "text", "text": "a photo"},
    ]}]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    hidden = model(**inputs, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape == (1, inputs["input_ids"].shape[1], TEXT_KWARGS["hidden_size"]), hidden.shape


def build_tiny_models(output_dir: str | Path = "tiny_models", force: bool = False) -> Path:
    """Build and save all tiny models under ``output_dir`` and return it.

    A finished build (one with the ``.complete`` marker) is reused unless ``force``. Otherwise the four model
    folders are rebuilt from scratch; nothing else in ``output_dir`` is touched.
    """
    output_dir = Path(output_dir)
    marker = output_dir / COMPLETE_MARKER
    if marker.exists() and not force:
        return output_dir
    # Stale files from an interrupted or older build must not survive into the new folders.
    marker.unlink(missing_ok=True)
    for name in MODEL_DIRS:
        shutil.rmtree(output_dir / name, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)

    zimage_dir, klein_dir, klein_base_dir, vl_dir = (output_dir / name for name in MODEL_DIRS)
    tokenizer = build_tokenizer()

    zimage = build_zimage(tokenizer)
    check_zimage_caption_sensitivity(zimage)
    zimage.save_pretrained(zimage_dir)
    print(f"saved {zimage_dir}")

    klein = build_klein(tokenizer, is_distilled=True)
    check_klein_caption_sensitivity(klein)
    klein.save_pretrained(klein_dir)
    print(f"saved {klein_dir}")
    klein.register_to_config(is_distilled=False)
    klein.save_pretrained(klein_base_dir)
    print(f"saved {klein_base_dir}")

    vlm, processor = build_qwen3_vl(tokenizer, zimage.text_encoder)
    check_qwen3_vl(vlm, processor)
    vlm.save_pretrained(vl_dir)
    processor.save_pretrained(vl_dir)
    print(f"saved {vl_dir}")

    marker.write_text("ok\n")
    return output_dir


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="tiny_models", help="where to write them (default: tiny_models)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished build exists")
    args = parser.parse_args()
    build_tiny_models(args.output_dir, force=args.force)


if __name__ == "__main__":
    main()
