# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""D-OPSD community pipeline, and the one definition of every supported model family.

Two things live here, and only here:

* The **model families** (Z-Image-Turbo, FLUX.2-klein). Everything that differs between them is in their classes:
  student and teacher conditions, the noise, the sigma schedule, the time and sign conventions, reference images and
  decoding. The training scripts import them, so training and inference share one definition.
* ``DOPSDPipeline``: few-step text-only inference with a trained LoRA (output identical to the stock pipeline), and a
  *teacher preview* that generates with the teacher's privileged context (prompt + reference image).

Every family speaks one convention to the outside, the flow-matching one: sigma = 1 is noise, a state is
``x = (1 - sigma) * x0 + sigma * noise``, a velocity is ``v = noise - x0``, so ``x0 = x - sigma * v`` and an Euler step
is ``x + (sigma_next - sigma) * v``. A family converts to its model's own convention inside ``velocity``.

The file imports only torch, diffusers, transformers and the standard library, so it also works when diffusers loads
it as ``custom_pipeline`` from a Hub repo or a local path.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from diffusers import DiffusionPipeline, Flux2KleinPipeline, ZImagePipeline
from diffusers.loaders import Flux2LoraLoaderMixin, ZImageLoraLoaderMixin
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas
from diffusers.utils.torch_utils import randn_tensor


def x0_from_velocity(x: torch.Tensor, sigma: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """Clean-sample prediction of a flow-convention velocity at noise level sigma."""
    return x - sigma * velocity


def euler_step(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """One Euler step of the flow ODE, sigma -> sigma_next."""
    return x + (sigma_next - sigma) * velocity


def weights_dtype(model) -> torch.dtype:
    """dtype of a model's weights, also through a distributed wrapper (DDP, DeepSpeed, FSDP keep it as .module).

    diffusers' `model.dtype` walks every submodule looking for casting hooks (about 10 ms on the 6B Z-Image with two
    adapters), so a caller that asks per rollout state should ask once and pass the answer to `velocity(dtype=...)`.
    """
    return getattr(model, "module", model).dtype


def rollout_sigmas(sigmas: torch.Tensor, rollout_steps: int) -> torch.Tensor:
    """The `rollout_steps` states D-OPSD trains on, taken from an inference schedule of N steps (N + 1 sigmas).

    Points are spread evenly over the N inference steps and always end on the terminal sigma 0, so rollout_steps = N is
    exactly the inference trajectory and N = 8, rollout_steps = 4 is every other point (the reference recipe).
    """
    num_inference_steps = len(sigmas) - 1
    if not 1 <= rollout_steps <= num_inference_steps:
        raise ValueError(f"rollout_steps must be between 1 and num_inference_steps={num_inference_steps}, got {rollout_steps}.")
    indices = torch.linspace(0, num_inference_steps, rollout_steps + 1).round().long()
    return sigmas[indices]


def dreambooth_noise_levels(family: "ModelFamily", batch_size: int, height: int, width: int, generator, device=None):
    """SFT noise levels drawn as diffusers' DreamBooth LoRA examples for Z-Image and FLUX.2-klein draw them
    (train_dreambooth_lora_z_image.py, train_dreambooth_lora_flux2_klein.py, default weighting "none"): an index
    uniform over the 1000 training sigmas of a fresh scheduler built from the model's config.

    That scheduler applies its shift at construction only when the shift is static: Z-Image-Turbo's sigmas carry its
    shift 3, klein's are unshifted (its shift is dynamic, set per resolution at inference only). Neither depends on the
    image size; the 1000-step inference schedule would (for klein its empirical mu at 1000 steps lies far outside the
    range it was fitted on and puts most noise levels near 0).
    """
    tables = family.__dict__.setdefault("_sft_sigmas", {})
    if str(device) not in tables:
        scheduler = type(family.pipe.scheduler).from_config(family.pipe.scheduler.config)
        tables[str(device)] = scheduler.sigmas.to(device=device, dtype=torch.float32)
    sigmas = tables[str(device)]
    u = torch.rand(batch_size, generator=generator, device=generator.device).to(device)
    return sigmas[(u * len(sigmas)).long()]


class ModelFamily:
    """What a model family provides. Conditions are dicts of tensors, one per sample, so they cache to disk as-is.

    Subclasses set the class attributes (used before any model is loaded) and implement the methods.
    """

    pipeline_class_name: str
    display_name: str
    native_steps: int
    default_learning_rate: float
    # --lora_preset name -> module-name suffixes to adapt; "reference" is what the paper's LoRAs adapted.
    lora_presets: dict[str, tuple[str, ...]]
    tags: tuple[str, ...]
    # The reference recipe (arXiv 2605.05204's scripts): samples per optimizer step (1 per GPU on 4 GPUs) and steps.
    reference_batch_size: int = 4
    reference_train_steps: int
    # Text the teacher's prompt gets after it, or None when the family's teacher takes no suffix.
    default_teacher_prompt_suffix: str | None = None
    # Whether the D-OPSD teacher reads the target image through a separate VLM (--teacher_vlm_name_or_path).
    teacher_reads_through_vlm = False
    # What the student does at inference: "text-to-image", or "edit" (instruction plus source images, in order).
    task = "text-to-image"
    # The Hub's pipeline tag of a model trained for this task, and what its model card says about the task.
    pipeline_tag = "text-to-image"
    card_note = ""

    @classmethod
    def usage(cls, prompt: str) -> tuple[str, str]:
        """(import lines, call arguments) of the model card's inference snippet."""
        return "", f'prompt="{prompt}"'

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe

    @classmethod
    def check_reference_image(cls, width: int, height: int) -> str | None:
        """Why an image of this size cannot be a teacher reference, or None if it can."""
        return None

    @classmethod
    def check_reference_rollout(cls, rollout_steps: int) -> str | None:
        """Why `--rollout_grid reference` cannot give `rollout_steps` states for this family, or None if it can."""
        return f"the reference implementation has no training grid for {cls.display_name}"

    @classmethod
    def license_for(cls, model_name: str) -> str:
        return "apache-2.0"

    @property
    def transformer(self):
        return self.pipe.transformer

    def default_size(self) -> tuple[int, int]:
        raise NotImplementedError

    # The stock pipelines' encode_prompt keeps this many tokens of the chat-templated prompt and drops the rest unsaid.
    max_sequence_length = 512
    # Keyword arguments of the family's chat template in the stock encode_prompt.
    chat_template_kwargs: dict = {}

    def text_prompts(self, caption: str, teacher: bool = True) -> list[str]:
        """The prompts the text encoder reads for a training caption (the student's, and the teacher's when it differs)."""
        return [caption]

    def _fits(self, caption: str, teacher: bool) -> bool:
        tokenizer = self.pipe.tokenizer
        for prompt in self.text_prompts(caption, teacher):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True, **self.chat_template_kwargs)
            if len(tokenizer(text)["input_ids"]) > self.max_sequence_length:
                return False
        return True

    def fit_caption(self, caption: str, teacher: bool = True) -> str:
        """The longest start of `caption`, in whole tokens, whose prompts the text encoder reads whole.

        The stock pipeline cuts a long prompt at max_sequence_length tokens, its chat template's closing tokens with
        it, so inference never sees more; training on the same start keeps the student's prompt and the teacher's (with
        its suffix, for klein) the same text, instead of the teacher losing its suffix or overflowing its context."""
        if self._fits(caption, teacher):
            return caption
        offsets = self.pipe.tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ends = [end for _, end in offsets]
        low, high = 0, len(ends)  # the most caption tokens that fit
        while low < high:
            middle = (low + high + 1) // 2
            if self._fits(caption[: ends[middle - 1]], teacher):
                low = middle
            else:
                high = middle - 1
        return caption[: ends[low - 1]].rstrip() if low else ""

    def encode_student(self, prompts: list[str], sources: list[list] | None = None) -> list[dict[str, torch.Tensor]]:
        """The student's condition per prompt: the inference path. `sources`: per prompt, the source images of an edit
        (editing families only)."""
        raise NotImplementedError

    def encode_teacher(self, prompts: list[str], images: list, sources: list[list] | None = None) -> list[dict[str, torch.Tensor]]:
        """The teacher's condition per prompt: the student's plus the target image (`images`)."""
        raise NotImplementedError

    def _text_only(self, sources):
        if sources and any(sources):
            raise ValueError(f"{self.display_name} text-to-image takes no source images: use the editing task.")

    def collate(self, conditions: list[dict[str, torch.Tensor]], device) -> dict:
        raise NotImplementedError

    def initial_noise(self, batch_size: int, height: int, width: int, generator=None, device=None) -> torch.Tensor:
        raise NotImplementedError

    def sigmas(self, num_inference_steps: int, height: int, width: int, device=None) -> torch.Tensor:
        """The N + 1 sigmas (ending at 0) the stock pipeline samples with at this size."""
        raise NotImplementedError

    def schedule(self, num_inference_steps: int, height: int, width: int, device=None) -> torch.Tensor:
        """`sigmas`, remembered per size: training asks for the same schedule at every step."""
        schedules = self.__dict__.setdefault("_schedules", {})
        key = (num_inference_steps, height, width, str(device))
        if key not in schedules:
            schedules[key] = self.sigmas(num_inference_steps, height, width, device)
        return schedules[key]

    def reference_rollout_sigmas(self, rollout_steps: int, height: int, width: int, device=None) -> torch.Tensor:
        """The `rollout_steps` + 1 sigmas the reference implementation trained on at this size (`--rollout_grid
        reference`), remembered per size."""
        schedules = self.__dict__.setdefault("_reference_rollouts", {})
        key = (rollout_steps, height, width, str(device))
        if key not in schedules:
            schedules[key] = self._reference_rollout_sigmas(rollout_steps, height, width, device)
        return schedules[key]

    def _reference_rollout_sigmas(self, rollout_steps: int, height: int, width: int, device=None) -> torch.Tensor:
        raise NotImplementedError(self.check_reference_rollout(rollout_steps))

    def sft_noise_levels(self, batch_size: int, height: int, width: int, generator, device=None) -> torch.Tensor:
        """Noise levels of one batch of vanilla flow-matching SFT (`--method sft`). Default: uniform over the inference
        schedule at 1000 steps for this size."""
        grid = self.schedule(1000, height, width, device)[:-1]
        u = torch.rand(batch_size, generator=generator, device=generator.device).to(device)
        return grid[(u * (len(grid) - 1)).round().long()]

    def velocity(self, transformer, x: torch.Tensor, sigma: torch.Tensor, condition: dict, attention_kwargs=None,
                 dtype: torch.dtype | None = None):
        """The flow velocity d x / d sigma at state x, as the stock pipeline computes it. `dtype`: the transformer's
        `weights_dtype`, when the caller already knows it."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Clean latents x0 in the rollout's state layout, for images in [-1, 1] of shape (B, 3, H, W)."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor, output_type: str = "pil"):
        raise NotImplementedError

    def teacher_ready(self) -> str | None:
        """Why the teacher context cannot be built yet, or None when it can."""
        return None

    @staticmethod
    def comfyui_lora(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
        """A diffusers-format LoRA (``transformer.<module>.lora_A/B.weight``) in ComfyUI's keys, with the alpha / rank
        scale folded into lora_B (so no ``.alpha`` keys are needed). Default: ``diffusion_model.<diffusers name>``."""
        return {
            "diffusion_model." + key.removeprefix("transformer."): value * scale if ".lora_B." in key else value
            for key, value in state_dict.items()
        }

    def setup_teacher(self, *, vlm_name_or_path=None, min_pixels=512 * 512, max_pixels=768 * 768, prompt_suffix=None,
                      needed=True, **load_kwargs):
        """Prepare what the teacher context needs; each family reads the options that concern it."""

    def encoders_for(self, kind: str) -> list[torch.nn.Module]:
        """The modules that compute one kind of cached input: "student" or "teacher" conditions, or SFT "latents"."""
        return {"student": [self.pipe.text_encoder], "teacher": [self.pipe.text_encoder, self.pipe.vae], "latents": [self.pipe.vae]}[kind]

    def drop_encoders(self, keep_vae: bool):
        """Forget the modules that only computed the cached inputs (the text encoder, a teacher encoder, and the VAE
        unless something will decode), so that training holds neither their device nor their host memory."""
        self.pipe.text_encoder = None
        if not keep_vae:
            self.pipe.vae = None

    def sample(self, transformer, condition: dict, x: torch.Tensor, sigmas: torch.Tensor, attention_kwargs=None, progress=None):
        """Few-step Euler sampling from state x along sigmas; the inference loop of every family."""
        for i in range(len(sigmas) - 1):
            v = self.velocity(transformer, x, sigmas[i], condition, attention_kwargs)
            x = euler_step(x, sigmas[i], sigmas[i + 1], v)
            if progress is not None:
                progress.update()
        return x


class ZImageFamily(ModelFamily):
    """Z-Image-Turbo. Student: Z-Image's own text path. Teacher: Qwen3-VL hidden states of [image, prompt], with the
    VLM's language model carrying Z-Image's text-encoder weights.

    The transformer's time runs the other way (t = 1 - sigma, 0 = noise) and it predicts x0 - noise, so ``velocity``
    feeds 1 - sigma and negates the output, exactly as ZImagePipeline does.
    """

    pipeline_class_name = "ZImagePipeline"
    display_name = "Z-Image-Turbo"
    native_steps = 8
    teacher_reads_through_vlm = True
    default_learning_rate = 1e-4
    # The reference's target list, attention and feed-forward of every block: there is nothing more to adapt.
    lora_presets = dict.fromkeys(("reference", "all"), (
        "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
    ))
    tags = ("z-image", "z-image-turbo")
    reference_train_steps = 2000
    chat_template_kwargs = {"enable_thinking": True}  # as ZImagePipeline._encode_prompt templates the prompt
    sft_noise_levels = dreambooth_noise_levels

    def __init__(self, pipe):
        super().__init__(pipe)
        self.teacher_encoder = None

    @classmethod
    def check_reference_rollout(cls, rollout_steps):
        if rollout_steps != 4:
            return f"the reference trained Z-Image-Turbo on 4 states only, got --rollout_steps {rollout_steps}"
        return None

    def _reference_rollout_sigmas(self, rollout_steps, height, width, device=None):
        # The reference's hard-coded grid {1, .9, .75, .5} -> 0 is every other point of the 8-step schedule (shift 3).
        return rollout_sigmas(self.schedule(8, height, width, device), 4)

    def default_size(self):
        return 1024, 1024

    def load_teacher_encoder(self, vlm_name_or_path: str, min_pixels: int, max_pixels: int, **load_kwargs):
        self.teacher_encoder = QwenVLTeacherEncoder.from_pretrained(
            vlm_name_or_path, self.pipe.text_encoder, min_pixels=min_pixels, max_pixels=max_pixels, **load_kwargs
        )
        return self.teacher_encoder

    def setup_teacher(self, *, vlm_name_or_path=None, min_pixels=512 * 512, max_pixels=768 * 768, prompt_suffix=None,
                      needed=True, **load_kwargs):
        if needed:
            self.load_teacher_encoder(vlm_name_or_path, min_pixels, max_pixels, **load_kwargs)

    def encoders_for(self, kind):
        return [self.teacher_encoder.model] if kind == "teacher" else super().encoders_for(kind)

    def drop_encoders(self, keep_vae):
        super().drop_encoders(keep_vae)
        self.teacher_encoder = None

    def teacher_ready(self):
        if self.teacher_encoder is None:
            return "the Z-Image teacher needs its Qwen3-VL encoder: call load_teacher_encoder(path) first."
        return None

    def max_caption_tokens(self) -> int:
        # The transformer pads captions to a multiple of 32 and places the image on RoPE axis 0 right after them,
        # so the padded caption plus one position must stay inside axes_lens[0].
        return (self.transformer.config.axes_lens[0] - 2) // 32 * 32

    @torch.no_grad()
    def encode_student(self, prompts, sources=None):
        self._text_only(sources)
        device = self.pipe.text_encoder.device
        embeds, _ = self.pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False)
        return [{"caption": e} for e in embeds]

    @torch.no_grad()
    def encode_teacher(self, prompts, images, sources=None):
        self._text_only(sources)
        if reason := self.teacher_ready():
            raise RuntimeError(reason)
        limit = self.max_caption_tokens()
        conditions = []
        for prompt, image in zip(prompts, images):
            caption = self.teacher_encoder(prompt, image)
            if caption.shape[0] > limit:
                raise ValueError(
                    f"The teacher context for {image.size[0]}x{image.size[1]} images is {caption.shape[0]} tokens, over "
                    f"the transformer's limit of {limit}: lower --teacher_max_pixels or shorten the prompt."
                )
            conditions.append({"caption": caption})
        return conditions

    def collate(self, conditions, device):
        return {"caption": [c["caption"].to(device) for c in conditions]}

    def initial_noise(self, batch_size, height, width, generator=None, device=None):
        # Same draw as ZImagePipeline.prepare_latents: float32 noise at the VAE's latent resolution.
        factor = self.pipe.vae_scale_factor * 2
        shape = (batch_size, self.transformer.config.in_channels, 2 * (height // factor), 2 * (width // factor))
        return randn_tensor(shape, generator=generator, device=torch.device(device or "cpu"), dtype=torch.float32)

    def sigmas(self, num_inference_steps, height, width, device=None):
        scheduler = copy.deepcopy(self.pipe.scheduler)
        config = scheduler.config
        factor = self.pipe.vae_scale_factor * 2
        mu = calculate_shift(
            (height // factor) * (width // factor),
            config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(num_inference_steps), mu=mu, device=device)
        return scheduler.sigmas.to(device=device, dtype=torch.float32)

    def velocity(self, transformer, x, sigma, condition, attention_kwargs=None, dtype=None):
        timestep = (1 - sigma).expand(x.shape[0])
        latents = list(x.to(dtype or weights_dtype(transformer)).unsqueeze(2).unbind(0))
        out = transformer(latents, timestep, condition["caption"], joint_attention_kwargs=attention_kwargs, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    @torch.no_grad()
    def encode_images(self, images):
        vae = self.pipe.vae
        latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
        return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).float()

    def decode(self, x, output_type="pil"):
        if output_type == "latent":
            return x
        vae = self.pipe.vae
        latents = x.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return self.pipe.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type=output_type)


class QwenVLTeacherEncoder:
    """Teacher context for Z-Image: hidden_states[-2] of a Qwen3-VL whose language model holds the Z-Image text
    encoder's weights, fed one user turn [image, prompt] plus the generation prompt, padding removed.

    The VLM keeps its own vision tower, merger and positional configuration; only the language trunk is swapped, so
    its hidden states live in the space the DiT was trained on (the paper's inherited in-context ability).
    """

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor

    @classmethod
    def from_pretrained(cls, name_or_path, text_encoder, min_pixels: int, max_pixels: int, torch_dtype=None, **kwargs):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        # The pixel budget of the image view (transformers 5 names it size={shortest_edge, longest_edge}, in pixels).
        size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        processor = AutoProcessor.from_pretrained(name_or_path, size=size, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=torch_dtype or text_encoder.dtype, **kwargs)
        language_model = model.model.language_model
        source = text_encoder.state_dict()
        target = language_model.state_dict()
        mismatched = sorted(set(source) ^ set(target)) + sorted(k for k in source.keys() & target.keys() if source[k].shape != target[k].shape)
        if mismatched:
            raise ValueError(
                f"The teacher VLM {name_or_path} does not match the text encoder ({len(mismatched)} keys differ, e.g. "
                f"{mismatched[0]}): use a Qwen3-VL of the text encoder's size (Qwen/Qwen3-VL-4B-Instruct for Z-Image-Turbo)."
            )
        language_model.load_state_dict(source, strict=True)
        model.requires_grad_(False).eval()
        return cls(model.to(text_encoder.device), processor)

    @property
    def device(self):
        return self.model.device

    def to(self, device):
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompt: str, image) -> torch.Tensor:
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        inputs = self.processor.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        hidden = self.model(**inputs, output_hidden_states=True).hidden_states[-2]
        return hidden[0][inputs["attention_mask"][0].bool()]


class Flux2KleinFamily(ModelFamily):
    """FLUX.2-klein 4B/9B. Student: klein's own text path. Teacher: the prompt plus a suffix through the same text path,
    plus the target image as a reference through klein's editing path (reference tokens after the noisy ones, position
    ids with t = 10, prediction sliced back to the noisy tokens).

    The state is kept as patchified, BatchNorm-normalised latents (B, 4C, H/16, W/16); packing into tokens happens in
    ``velocity``. sigma is the transformer's timestep (1 = noise) and its output is already the flow velocity.
    """

    pipeline_class_name = "Flux2KleinPipeline"
    display_name = "FLUX.2-klein"
    native_steps = 4
    default_learning_rate = 2e-5
    _double_stream_attention = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    )
    lora_presets = {
        # What the reference's target list matches in diffusers' FLUX.2 transformer: its feed-forward names
        # (ff.net.0.proj, ff.net.2, ...) match nothing in Flux2FeedForward (linear_in, linear_out), so the paper's klein
        # LoRAs adapted the double-stream attention only.
        "reference": _double_stream_attention,
        # Also the double-stream feed-forwards and every single-stream block (matched by name: 20 in 4B, 24 in 9B).
        "all": _double_stream_attention + (
            "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
            "attn.to_qkv_mlp_proj", "attn.to_out",
        ),
    }
    tags = ("flux2", "flux2-klein")
    reference_train_steps = 3001
    chat_template_kwargs = {"enable_thinking": False}  # as Flux2KleinPipeline._get_qwen3_prompt_embeds templates it
    # The reference scripts' --edit-sys-prompt.
    default_teacher_prompt_suffix = (
        "Make the main subject (facial/ip details), background, and overall composition consistent with the reference image."
    )
    sft_noise_levels = dreambooth_noise_levels

    def __init__(self, pipe):
        super().__init__(pipe)
        self.teacher_prompt_suffix = self.default_teacher_prompt_suffix
        text_encoder = getattr(pipe, "text_encoder", None)
        # The stock pipeline draws its noise in the prompt-embedding dtype; draw the same numbers.
        self.noise_dtype = text_encoder.dtype if text_encoder is not None else torch.float32

    @classmethod
    def check_reference_image(cls, width, height):
        if min(width, height) < 64:
            return f"{width}x{height} is smaller than FLUX.2-klein's 64 px minimum side for reference images"
        if max(width, height) / min(width, height) > 8:
            return f"{width}x{height} has an aspect ratio over FLUX.2-klein's limit of 8"
        return None

    @classmethod
    def check_reference_rollout(cls, rollout_steps):
        return None

    def _reference_rollout_sigmas(self, rollout_steps, height, width, device=None):
        # The reference asks the scheduler for a `rollout_steps`-step grid without passing sigmas, so diffusers spaces
        # it linspace(1, 0.001) before the time shift (mu for `rollout_steps` steps), and ends it at 0. It does not
        # visit the inference states: at 1024 px its last state is sigma ~0.01.
        factor = self.pipe.vae_scale_factor * 2
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        mu = compute_empirical_mu(image_seq_len=(height // factor) * (width // factor), num_steps=rollout_steps)
        scheduler.set_timesteps(rollout_steps, mu=mu, device=device)
        sigmas = scheduler.timesteps.to(device=device, dtype=torch.float32) / 1000  # as the reference reads them
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    @classmethod
    def license_for(cls, model_name):
        # klein-4B is Apache-2.0; klein-9B ships under the FLUX non-commercial licence.
        return "other" if "9b" in model_name.lower() else "apache-2.0"

    def setup_teacher(self, *, vlm_name_or_path=None, min_pixels=512 * 512, max_pixels=768 * 768, prompt_suffix=None,
                      needed=True, **load_kwargs):
        if prompt_suffix is not None:
            self.teacher_prompt_suffix = prompt_suffix

    # diffusers module -> BFL module, as ComfyUI (and diffusers' own BFL converter) name FLUX.2 weights.
    _BFL_NAMES = {
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
        "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
        "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
    }
    _BFL_FUSED_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                      "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}

    @classmethod
    def comfyui_lora(cls, state_dict, scale):
        """FLUX.2 LoRAs load in ComfyUI under BFL names (``diffusion_model.double_blocks.N.img_attn.qkv``,
        ``single_blocks.N.linear1``...). q, k and v are fused: their A factors are stacked and their B factors placed
        block-diagonally, which is exactly the sum of the three LoRAs (at rank 3r)."""
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            module, factor = key.removeprefix("transformer.").rsplit(".lora_", 1)
            modules.setdefault(module, {})[factor.split(".")[0]] = value * scale if factor.startswith("B") else value
        out = {}
        for module, factors in list(modules.items()):
            block, index, rest = module.split(".", 2) if module.count(".") >= 2 else (module, "", "")
            if block == "single_transformer_blocks" and rest in ("attn.to_qkv_mlp_proj", "attn.to_out"):
                target = f"single_blocks.{index}.{'linear1' if rest.endswith('proj') else 'linear2'}"
            elif block == "transformer_blocks" and rest in cls._BFL_NAMES:
                target = f"double_blocks.{index}.{cls._BFL_NAMES[rest]}"
            elif block == "transformer_blocks" and any(rest in group for group in cls._BFL_FUSED_QKV.values()):
                continue  # fused below
            else:
                raise ValueError(f"cannot name LoRA module {module} in ComfyUI's FLUX.2 layout: use --lora_format diffusers.")
            out[f"diffusion_model.{target}.lora_A.weight"] = factors["A"]
            out[f"diffusion_model.{target}.lora_B.weight"] = factors["B"]
        blocks = sorted({m.split(".")[1] for m in modules if m.startswith("transformer_blocks.")}, key=int)
        for index in blocks:
            for fused, parts in cls._BFL_FUSED_QKV.items():
                present = [modules.get(f"transformer_blocks.{index}.{part}") for part in parts]
                if not any(present):
                    continue
                reference = next(f for f in present if f)
                rows, rank = reference["B"].shape[0], reference["A"].shape[0]
                a = torch.zeros(3 * rank, reference["A"].shape[1], dtype=reference["A"].dtype)
                b = torch.zeros(3 * rows, 3 * rank, dtype=reference["B"].dtype)
                for i, factors in enumerate(present):
                    if factors:
                        a[i * rank : (i + 1) * rank] = factors["A"]
                        b[i * rows : (i + 1) * rows, i * rank : (i + 1) * rank] = factors["B"]
                out[f"diffusion_model.double_blocks.{index}.{fused}.lora_A.weight"] = a
                out[f"diffusion_model.double_blocks.{index}.{fused}.lora_B.weight"] = b
        return out

    def default_size(self):
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size

    def teacher_prompt(self, prompt: str) -> str:
        return f"{prompt} {self.teacher_prompt_suffix}".strip()

    def text_prompts(self, caption: str, teacher: bool = True) -> list[str]:
        return [caption, self.teacher_prompt(caption)] if teacher else [caption]

    @torch.no_grad()
    def _encode_text(self, prompts):
        device = self.pipe.text_encoder.device
        embeds, text_ids = self.pipe.encode_prompt(list(prompts), device=device)
        return [{"prompt_embeds": e[None], "text_ids": t[None]} for e, t in zip(embeds, text_ids)]

    @torch.no_grad()
    def encode_student(self, prompts, sources=None):
        self._text_only(sources)
        return self._encode_text(prompts)

    @torch.no_grad()
    def encode_teacher(self, prompts, images, sources=None):
        self._text_only(sources)
        return self._with_references(self._encode_text([self.teacher_prompt(p) for p in prompts]), [[image] for image in images])

    def _with_references(self, conditions, references):
        """Add each condition's reference images as klein's editing path takes them: preprocessed as the stock pipeline
        does, VAE-encoded, packed one after the other with position ids t = 10, 20, ... in their order."""
        for condition, images in zip(conditions, references):
            latents, ids = self.pipe.prepare_image_latents(
                images=[self.preprocess_reference(image) for image in images], batch_size=1, generator=None,
                device=self.pipe.vae.device, dtype=self.pipe.vae.dtype,
            )
            condition.update(reference_latents=latents, reference_ids=ids)
        return conditions

    def preprocess_reference(self, image) -> torch.Tensor:
        """The stock pipeline's reference preprocessing: at most 1 MP, cropped to a multiple of 16, in [-1, 1]."""
        processor = self.pipe.image_processor
        processor.check_image_input(image)
        if image.size[0] * image.size[1] > 1024 * 1024:
            image = processor._resize_to_target_area(image, 1024 * 1024)
        multiple = self.pipe.vae_scale_factor * 2
        width, height = image.size[0] // multiple * multiple, image.size[1] // multiple * multiple
        return processor.preprocess(image, height=height, width=width, resize_mode="crop")

    def collate(self, conditions, device):
        return {key: torch.cat([c[key] for c in conditions]).to(device) for key in conditions[0]}

    def initial_noise(self, batch_size, height, width, generator=None, device=None):
        factor = self.pipe.vae_scale_factor * 2
        shape = (batch_size, self.transformer.config.in_channels, height // factor, width // factor)
        noise = randn_tensor(shape, generator=generator, device=torch.device(device or "cpu"), dtype=self.noise_dtype)
        return noise.float()

    def sigmas(self, num_inference_steps, height, width, device=None):
        factor = self.pipe.vae_scale_factor * 2
        scheduler = copy.deepcopy(self.pipe.scheduler)
        mu = compute_empirical_mu(image_seq_len=(height // factor) * (width // factor), num_steps=num_inference_steps)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), mu=mu, device=device)
        return scheduler.sigmas.to(device=device, dtype=torch.float32)

    def velocity(self, transformer, x, sigma, condition, attention_kwargs=None, dtype=None):
        batch, channels, height, width = x.shape
        dtype = dtype or weights_dtype(transformer)
        tokens = self.pipe._pack_latents(x)
        ids = self.pipe._prepare_latent_ids(x).to(x.device)
        if "reference_latents" in condition:
            tokens = torch.cat([tokens, condition["reference_latents"].to(tokens.dtype)], dim=1)
            ids = torch.cat([ids, condition["reference_ids"].to(ids.device)], dim=1)
        out = transformer(
            hidden_states=tokens.to(dtype),
            timestep=sigma.expand(batch).to(dtype),
            guidance=None,
            encoder_hidden_states=condition["prompt_embeds"],
            txt_ids=condition["text_ids"],
            img_ids=ids,
            joint_attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
        return out[:, : height * width].float().permute(0, 2, 1).reshape(batch, channels, height, width)

    @torch.no_grad()
    def encode_images(self, images):
        vae = self.pipe.vae
        return self.pipe._encode_vae_image(images.to(vae.device, vae.dtype), generator=None).float()

    def decode(self, x, output_type="pil"):
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.device, x.dtype)
        latents = self.pipe._unpatchify_latents(x * std + mean)
        if output_type == "latent":
            return latents
        image = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type)


class Flux2KleinEditFamily(Flux2KleinFamily):
    """FLUX.2-klein editing: the student is the stock editing path, the instruction with the source images as
    references (``Flux2KleinPipeline(image=sources, prompt=instruction)``); the teacher additionally sees the target
    edit as the last reference (position id t = 10 * (number of sources + 1)) and the instruction with a suffix that
    says so (the reference's gt-ref variant)."""

    task = "edit"
    pipeline_tag = "image-to-image"
    card_note = ("It edits images, as the stock editing path does: pass the source image(s) as `image=` (in the order "
                 "they were trained in) and the instruction as `prompt=`.")
    # The suffix of the reference's flux2-klein-edit-self-distill-gt-ref scripts.
    default_teacher_prompt_suffix = (
        "Note that the last image is the output image I expect to be. Your output must be as similar as the last "
        "reference image, based on the first reference image and the editing instructions."
    )

    @torch.no_grad()
    def encode_student(self, prompts, sources=None):
        return self._with_references(self._encode_text(prompts), self._sources(prompts, sources))

    @torch.no_grad()
    def encode_teacher(self, prompts, images, sources=None):
        references = [[*group, target] for group, target in zip(self._sources(prompts, sources), images)]
        return self._with_references(self._encode_text([self.teacher_prompt(p) for p in prompts]), references)

    @classmethod
    def usage(cls, prompt):
        return "from diffusers.utils import load_image\n", f'image=[load_image("source.png")], prompt="{prompt}"'

    def _sources(self, prompts, sources):
        if sources is None or len(sources) != len(prompts) or not all(sources):
            raise ValueError("an edit needs its source images: pass at least one per prompt.")
        return [list(group) for group in sources]


FAMILIES: dict[str, type[ModelFamily]] = {f.pipeline_class_name: f for f in (ZImageFamily, Flux2KleinFamily)}
EDIT_FAMILIES: dict[str, type[ModelFamily]] = {Flux2KleinEditFamily.pipeline_class_name: Flux2KleinEditFamily}
TASKS = ("text-to-image", "edit")


def family_class(pipeline_class_name: str, task: str = "text-to-image") -> type[ModelFamily]:
    """The family for a `_class_name` of model_index.json and a task, or a ValueError that says what is supported."""
    if pipeline_class_name not in FAMILIES:
        supported = ", ".join(f"{f.display_name} ({name})" for name, f in FAMILIES.items())
        raise ValueError(f"{pipeline_class_name} is not supported; D-OPSD here supports step-distilled {supported}.")
    if task == "edit":
        if pipeline_class_name not in EDIT_FAMILIES:
            editable = ", ".join(f.display_name for f in EDIT_FAMILIES.values())
            raise ValueError(f"{FAMILIES[pipeline_class_name].display_name} has no editing path: edit LoRAs are for {editable}.")
        return EDIT_FAMILIES[pipeline_class_name]
    return FAMILIES[pipeline_class_name]


def family_for(pipe: DiffusionPipeline) -> ModelFamily:
    """The family object of a loaded stock (or D-OPSD) pipeline."""
    if isinstance(pipe, DOPSDPipeline):
        return pipe.family
    for cls, stock in _STOCK.items():
        if isinstance(pipe, stock):
            return cls(pipe)
    return family_class(type(pipe).__name__)(pipe)  # raises, listing what is supported


_STOCK = {ZImageFamily: ZImagePipeline, Flux2KleinFamily: Flux2KleinPipeline}
_LORA_LOADERS = {ZImageFamily: ZImageLoraLoaderMixin, Flux2KleinFamily: Flux2LoraLoaderMixin}


class DOPSDPipeline(DiffusionPipeline, ZImageLoraLoaderMixin, Flux2LoraLoaderMixin):
    """Few-step inference for D-OPSD fine-tuned Z-Image-Turbo and FLUX.2-klein models, plus a teacher preview.

    ```py
    pipe = DiffusionPipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", custom_pipeline="pipeline_dopsd.py",
                                             trust_remote_code=True)
    pipe.load_lora_weights("user/my-dopsd-lora")
    image = pipe(prompt="a photo of [V] dog on a beach").images[0]
    ```
    The family is chosen from the transformer. LoRA loading, ``set_adapters`` and ``fuse_lora`` behave as on the stock
    pipeline of that family.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, is_distilled: bool | None = None):
        super().__init__()
        self.register_modules(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
        if is_distilled is not None:
            self.register_to_config(is_distilled=is_distilled)
        self._family = None

    @property
    def family(self) -> ModelFamily:
        """The text-to-image family of this model."""
        if self._family is None:
            if type(self.transformer).__name__.startswith("ZImage"):
                stock = ZImagePipeline(**self.components)
                self._family = ZImageFamily(stock)
            elif type(self.transformer).__name__.startswith("Flux2"):
                stock = Flux2KleinPipeline(**self.components, is_distilled=bool(self.config.get("is_distilled", True)))
                self._family = Flux2KleinFamily(stock)
            else:
                raise ValueError(f"DOPSDPipeline supports {', '.join(FAMILIES)}; got a {type(self.transformer).__name__}.")
        return self._family

    def family_for_task(self, task: str) -> ModelFamily:
        """The family for "text-to-image" or "edit", over the same stock pipeline (and so the same weights and LoRAs)."""
        family = self.family
        if task == family.task:
            return family
        families = self.__dict__.setdefault("_task_families", {})
        if task not in families:
            families[task] = family_class(family.pipeline_class_name, task)(family.pipe)
        return families[task]

    def load_teacher_encoder(self, vlm_name_or_path: str, min_pixels: int = 512 * 512, max_pixels: int = 768 * 768, **kwargs):
        """Z-Image only: load the Qwen3-VL teacher encoder (its language model gets this text encoder's weights)."""
        if not isinstance(self.family, ZImageFamily):
            raise ValueError("load_teacher_encoder is for Z-Image; FLUX.2-klein's teacher uses its own editing path.")
        return self.family.load_teacher_encoder(vlm_name_or_path, min_pixels, max_pixels, **kwargs)

    # LoRA: dispatch to the loader mixin of the family, so key conversions are those of the stock pipeline.
    def _lora_loader(self):
        return _LORA_LOADERS[type(self.family)]

    def lora_state_dict(self, *args, **kwargs):
        return self._lora_loader().lora_state_dict(*args, **kwargs)

    def load_lora_weights(self, *args, **kwargs):
        return self._lora_loader().load_lora_weights(self, *args, **kwargs)

    def fuse_lora(self, *args, **kwargs):
        return self._lora_loader().fuse_lora(self, *args, **kwargs)

    def unfuse_lora(self, *args, **kwargs):
        return self._lora_loader().unfuse_lora(self, *args, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image=None,
        reference_image=None,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
    ):
        """Generate at the family's native step count (Z-Image-Turbo 8, klein 4) unless `num_inference_steps` is given.

        `image` (FLUX.2-klein): the source image(s) of an edit, one PIL image or a list used for every prompt, as the
        stock ``Flux2KleinPipeline(image=...)`` takes them; the output defaults to the first source's size.
        With `reference_image` (one PIL image, or one per prompt) the teacher's context is used instead of the student's:
        a preview of what D-OPSD will distil into the student (for an edit, the reference is the target edit).
        `latents` are in the family's state layout (as returned by ``initial_noise``).
        """
        if not isinstance(prompt, str) and not (isinstance(prompt, (list, tuple)) and prompt
                                                and all(isinstance(p, str) for p in prompt)):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}.")
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        family = self.family_for_task("text-to-image" if image is None else "edit")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        default_height, default_width = family.default_size()
        sources = None
        if image is not None:
            sources = [list(image) if isinstance(image, (list, tuple)) else [image]] * len(prompts)
            # As the stock editing path, the output defaults to the (preprocessed) first source's size.
            default_height, default_width = family.preprocess_reference(sources[0][0]).shape[-2:]
        if reference_image is not None:
            references = reference_image if isinstance(reference_image, (list, tuple)) else [reference_image] * len(prompts)
            if len(references) != len(prompts):
                raise ValueError(f"Got {len(references)} reference images for {len(prompts)} prompts: pass one, or one per prompt.")
            if reason := family.teacher_ready():
                raise RuntimeError(reason)
            conditions = family.encode_teacher(prompts, references, sources)
            if isinstance(family, Flux2KleinFamily) and image is None:
                # Like the stock editing path, the output defaults to the (preprocessed) reference's size.
                default_height, default_width = family.preprocess_reference(references[0]).shape[-2:]
        else:
            conditions = family.encode_student(prompts, sources)
        height, width = height or default_height, width or default_width
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}.")

        device = self._execution_device
        conditions = [c for c in conditions for _ in range(num_images_per_prompt)]
        condition = family.collate(conditions, device)
        if latents is None:
            latents = family.initial_noise(len(conditions), height, width, generator, device)
        steps = family.native_steps if num_inference_steps is None else num_inference_steps
        sigmas = family.sigmas(steps, height, width, device)
        with self.progress_bar(total=len(sigmas) - 1) as progress:
            latents = family.sample(self.transformer, condition, latents.to(device).float(), sigmas, attention_kwargs, progress)
        images = family.decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)
