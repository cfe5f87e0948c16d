"""What ComfyUI does with a LoRA file, in a few lines, so tests can check our files against it without ComfyUI.

Facts from ComfyUI's loader (comfy/lora.py, comfy/weight_adapter/lora.py, the key maps of comfy/utils.py), not its code:
- A module's factors are `<x>.lora_B.weight` (up) and `<x>.lora_A.weight` (down), among other spellings.
- Its alpha is read only from a `<x>.alpha` tensor; the delta is (alpha / rank) · up @ down, and 1 · up @ down when no
  `.alpha` key exists. The safetensors metadata (where PEFT writes lora_alpha) is never read.
- Z-Image: diffusers module names are accepted under `diffusion_model.`, `transformer.` or no prefix (Comfy maps
  to_q/k/v onto slices of its fused qkv; the delta of each slice is that module's delta).
- FLUX.2: diffusers names under `transformer.` (single-stream blocks since ComfyUI 0.9.2), and BFL names under
  `diffusion_model.` (double_blocks.N.img_attn.qkv is q, k, v stacked by rows, and so on).
- A key that maps to nothing is reported ("lora key not loaded") and ignored.
"""

from __future__ import annotations

import torch

_BFL_DOUBLE = {  # BFL name inside double_blocks.N -> diffusers names inside transformer_blocks.N, split by rows
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",),
}
_BFL_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}


def _targets(module: str, family: str) -> list[str] | None:
    """The diffusers modules a LoRA module of the file patches in ComfyUI (several: equal row blocks), or None."""
    for prefix in ("diffusion_model.", "transformer.", ""):
        if module.startswith(prefix):
            break
    name = module[len(prefix):]
    if family == "z-image":
        return [name]
    if prefix == "transformer.":
        return [name]
    if prefix == "diffusion_model.":
        block, index, rest = (name.split(".", 2) + ["", ""])[:3]
        if block == "double_blocks" and rest in _BFL_DOUBLE:
            return [f"transformer_blocks.{index}.{t}" for t in _BFL_DOUBLE[rest]]
        if block == "single_blocks" and rest in _BFL_SINGLE:
            return [f"single_transformer_blocks.{index}.{_BFL_SINGLE[rest]}"]
    return None


def comfyui_deltas(state: dict[str, torch.Tensor], family: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(delta W per diffusers module name, in float64; keys ComfyUI would not load)."""
    deltas, loaded = {}, set()
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        targets = _targets(module, family)
        if targets is None or f"{module}.lora_B.weight" not in state:
            continue
        down, up = state[key].double(), state[f"{module}.lora_B.weight"].double()
        alpha = state.get(f"{module}.alpha")
        scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
        delta = scale * (up @ down)
        for target, rows in zip(targets, delta.chunk(len(targets), dim=0)):
            deltas[target] = deltas.get(target, 0) + rows
        loaded |= {key, f"{module}.lora_B.weight", f"{module}.alpha"}
    return deltas, set(state) - loaded
