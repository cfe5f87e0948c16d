#!/usr/bin/env bash
# Quick start on the tiny offline models: build them if missing, train a D-OPSD LoRA for a few steps on the sample
# concept shipped in examples/tiny_concept (afresh each time: --overwrite_output_dir), then load the LoRA into the
# stock ZImagePipeline and save a sample image.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${1:-quickstart-output}

python tools/make_tiny_models.py --output_dir tiny_models
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no train_dopsd_lora.py \
  --pretrained_model_name_or_path tiny_models/z-image \
  --teacher_vlm_name_or_path tiny_models/qwen3-vl-teacher --teacher_min_pixels 1024 --teacher_max_pixels 4096 \
  --instance_data_dir examples/tiny_concept --instance_prompt "a photo of [V] toy" \
  --output_dir "$out" --overwrite_output_dir --resolution 64 --rank 8 --lora_alpha 8 --learning_rate 1e-3 \
  --max_train_steps 30 --checkpointing_steps 15 --validation_steps 15 --report_to tensorboard

python - "$out" <<'PY'
import sys
import torch
from diffusers import ZImagePipeline

out = sys.argv[1]
pipe = ZImagePipeline.from_pretrained("tiny_models/z-image")
pipe.load_lora_weights(out)
image = pipe(prompt="a photo of [V] toy on a beach", num_inference_steps=8, guidance_scale=0.0, height=64, width=64,
             generator=torch.Generator().manual_seed(0)).images[0]
image.save(f"{out}/sample.png")
print(f"wrote {out}/pytorch_lora_weights.safetensors, {out}/sample.png and validation grids in {out}/samples/")
PY
