# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""The method and the training program both scripts run: the D-OPSD and SFT steps, the EMA teacher update, one run's
state (loading, condition caching) and the training loop. Arguments are in dopsd_args.py, data and conditions in
dopsd_data.py, validation grids in dopsd_validation.py, checkpoints and the model card in dopsd_outputs.py.

The method in one paragraph (arXiv 2605.05204): the same network is the student (the inference path: text only, or
an edit's instruction and sources) and the teacher (an EMA of the student that also sees the target image). The student rolls out its own few-step
trajectory from noise; at every state both predict, and the loss pulls the student's prediction onto the teacher's.
Model-family and task specifics (conditions, schedules, conventions) live in pipeline_dopsd.py; nothing here branches
on them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from dopsd_args import UserError, check_teacher_vlm
from dopsd_engines import engine_for, report
from dopsd_data import BucketBatches, ConditionCache, Example, caption_of, collect_raw_examples, load_examples
from dopsd_outputs import (check_resume_matches, checkpoint_dirs, claim_output_dir, forget_after, public_args, push_to_hub,
                           refuse_earlier_run, resolve_resume, save_args, save_checkpoint, save_final_outputs, trigger_words,
                           write_model_card)
from dopsd_validation import preview_teacher, validate
from pipeline_dopsd import ModelFamily, euler_step, rollout_sigmas, x0_from_velocity

logger = logging.getLogger("dopsd")


# ----------------------------------------------------------------------------------------------------------------------
# The method


def distillation_loss(x, sigma, v_student, v_teacher, loss_space: str) -> torch.Tensor:
    """MSE between the student's and the teacher's predictions at the same state (x0 space weighs it by sigma^2)."""
    if loss_space == "x0":
        return F.mse_loss(x0_from_velocity(x, sigma, v_student), x0_from_velocity(x, sigma, v_teacher))
    return F.mse_loss(v_student, v_teacher)


def dopsd_step(student, teacher, noise, sigmas, loss_space="x0", backward=None, rollout_context=contextlib.nullcontext,
               off_policy_x0=None):
    """One D-OPSD iteration on the student's own few-step rollout from `noise` along `sigmas`.

    `student(x, sigma)` and `teacher(x, sigma)` return velocities for a state. At every state: the teacher's prediction
    (no grad), the student's prediction, their loss, its backward (`backward(loss)`, which must scale by
    1 / rollout steps), and an Euler step with the student's velocity. The state is detached at every step, so one
    backward per state gives exactly the gradient of the averaged loss while memory stays flat in the number of steps.
    `rollout_context()` wraps each student forward+backward (e.g. `accelerator.accumulate`). Returns the per-state losses.

    `off_policy_x0` is the ablation the paper rejects: the same supervision on the noised ground truth
    (1 - sigma) * x0 + sigma * noise at each sigma instead of the student's own states.
    """
    x, losses = noise, []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x.detach() if off_policy_x0 is None else (1 - sigma) * off_policy_x0 + sigma * noise
        with torch.no_grad():
            v_teacher = teacher(x, sigma)
        with rollout_context():
            v_student = student(x, sigma)
            loss = distillation_loss(x, sigma, v_student, v_teacher, loss_space)
            if backward is not None:
                backward(loss)
        losses.append(loss.detach().clone())  # mse_loss's scalar can view its elementwise buffer (it does on a CPU)
        x = euler_step(x, sigma, sigma_next, v_student.detach())
    return losses


def sft_step(student, x0, noise, sigma, backward=None):
    """Vanilla flow-matching SFT (the paper's baseline): regress the velocity noise - x0 at the noised ground truth."""
    sigma_b = sigma.view(-1, *([1] * (x0.dim() - 1)))
    x = (1 - sigma_b) * x0 + sigma_b * noise
    loss = F.mse_loss(student(x, sigma), noise - x0)
    if backward is not None:
        backward(loss)
    return loss.detach().clone()  # as in dopsd_step: not a view of the elementwise buffer


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], decay: float):
    """teacher <- decay * teacher + (1 - decay) * student, in the teacher's own (fp32) precision."""
    if decay >= 1.0 or not teacher_params:
        return
    student_params = [s.detach().to(t.dtype) for t, s in zip(teacher_params, student_params)]
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - decay)


def make_optimizer(args, params, engine_owns_step: bool = False):
    """AdamW over the trainable parameters (bitsandbytes' 8-bit AdamW with --use_8bit_adam).

    torch's fused AdamW updates every tensor in one kernel (a third of the foreach step's time on the tiny models),
    except where an engine re-partitions the parameters under the optimizer (`engine_owns_step`: DeepSpeed ZeRO)."""
    options = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                   eps=args.adam_epsilon)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes.") from None
        return bnb.optim.AdamW8bit(params, **options)
    return torch.optim.AdamW(params, fused=not engine_owns_step, **options)


def sample_sft_sigmas(family: ModelFamily, batch: int, height: int, width: int, generator, device) -> torch.Tensor:
    """Noise levels of one SFT batch, drawn as the family says (Z-Image-Turbo and klein: as diffusers' DreamBooth LoRA
    examples draw them, `pipeline_dopsd.dreambooth_noise_levels`)."""
    return family.sft_noise_levels(batch, height, width, generator, device)


def training_rollout_sigmas(family: ModelFamily, args, height: int, width: int, device) -> torch.Tensor:
    """The sigmas one D-OPSD rollout trains on: --rollout_steps states of the deployment schedule, or with
    --rollout_grid reference the grid the reference implementation trained on."""
    if args.rollout_grid == "reference":
        return family.reference_rollout_sigmas(args.rollout_steps, height, width, device)
    return rollout_sigmas(family.schedule(args.num_inference_steps, height, width, device), args.rollout_steps)


# ----------------------------------------------------------------------------------------------------------------------
# The training program both scripts run; `adaptation` is what differs (a LoRA teacher adapter, or an EMA weight copy).


def load_base_pipeline(args, weight_dtype, transformer_kwargs: dict):
    """The stock pipeline; `transformer_kwargs` (e.g. a quantization config) apply to its transformer only."""
    from diffusers import AutoModel, DiffusionPipeline

    common = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir, dtype=weight_dtype)
    components = {}
    if transformer_kwargs:
        components["transformer"] = AutoModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer", **common, **transformer_kwargs)
    return DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **common, **components)


def condition_fingerprint(args, dtype) -> str:
    """Everything a cached condition depends on besides its prompt and image."""
    return json.dumps({
        "model": str(args.pretrained_model_name_or_path), "revision": args.revision, "variant": args.variant, "dtype": str(dtype),
        "teacher_vlm": str(args.teacher_vlm_name_or_path), "teacher_pixels": [args.teacher_min_pixels, args.teacher_max_pixels],
        "teacher_prompt_suffix": args.teacher_prompt_suffix, "format": 1,
    }, sort_keys=True)


def validation_rows(args, examples) -> list[Example]:
    """The rows of the grids, as examples with one caption: --validation_prompt with the first training example's
    image as the teacher's reference (and its sources, for an edit), or else the first caption of each training
    example (at most four)."""
    if args.validation_prompt:
        first = examples[0]
        return [Example("validation", first.image, [prompt], first.sources) for prompt in args.validation_prompt]
    return [Example(e.name, e.image, e.captions[:1], e.sources) for e in examples[:4]]


class Run:
    """State of one training run, so the loop below reads top to bottom."""

    def __init__(self, args, family_cls, adaptation_cls):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.args = args
        raw = collect_raw_examples(args)
        self.examples = load_examples(args, raw, family_cls)
        # Every rollout state is one micro-batch of gradient accumulation: accelerate then scales each per-state loss
        # by 1 / (rollout_steps * accumulation), syncs gradients only after the last state, and steps the optimizer once.
        micro_steps = args.gradient_accumulation_steps * (args.rollout_steps if args.method == "dopsd" else 1)
        self.accelerator = Accelerator(
            # With no accelerator at all, `--multi_gpu` processes still form a (gloo) process group on the CPU.
            cpu=not torch.accelerator.is_available(),
            gradient_accumulation_steps=micro_steps, mixed_precision=args.mixed_precision,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / args.logging_dir)),
        )
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if self.accelerator.is_main_process else logging.WARNING)
        self.engine = engine_for(self.accelerator)  # refuses a launch whose engine accelerate did not set up
        self.engine.configure(args)
        set_seed(args.seed)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.validates = bool(args.validation_steps or not args.skip_final_validation or args.preview_teacher_only)
        if self.engine.shards_parameters and self.validates:
            raise UserError("validation samples from the whole model on one rank, which ZeRO-3 and FSDP shard: pass "
                            "--validation_steps 0 --skip_final_validation and evaluate the saved model with evaluate_dopsd.py.")
        adaptation_cls.check_engine(args, self.engine)
        if family_cls.teacher_reads_through_vlm and args.method == "dopsd":
            check_teacher_vlm(args)
        claim_output_dir(args)  # the input and the launch are good: from here on this run writes into --output_dir
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)

        with self.engine.zero3_init_disabled():
            pipe = load_base_pipeline(args, self.weight_dtype, adaptation_cls.transformer_load_kwargs(args, self.weight_dtype))
            self.family = family_cls(pipe)
            self.family.setup_teacher(
                vlm_name_or_path=args.teacher_vlm_name_or_path, min_pixels=args.teacher_min_pixels, max_pixels=args.teacher_max_pixels,
                prompt_suffix=args.teacher_prompt_suffix, needed=args.method == "dopsd",
                cache_dir=args.cache_dir,
            )
        self.rows = validation_rows(args, self.examples)
        self.conditions = ConditionCache(args.condition_cache_dir, condition_fingerprint(args, self.weight_dtype))
        self.conditions.fill(self.family, self.examples, args.method, self.rows, self.device,
                             self.accelerator.process_index, self.accelerator.num_processes)
        self.accelerator.wait_for_everyone()
        for example in self.examples:
            example.image = example.sources = None  # conditions are cached; the validation rows keep their own images
        self.validation_teacher = [self.conditions.teacher_row(i) for i in range(len(self.rows))] if args.method == "dopsd" else []
        self.family.drop_encoders(keep_vae=self.validates)
        from diffusers.training_utils import free_memory

        free_memory()

        # A quantized base is placed on its device when loaded and cannot be moved.
        self.transformer = pipe.transformer if getattr(pipe.transformer, "is_quantized", False) else pipe.transformer.to(self.device)
        self.transformer.requires_grad_(False)
        if args.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.adaptation = adaptation_cls(args, self.family, self.transformer, self.accelerator, self.weight_dtype)

    # -- forwards -------------------------------------------------------------------------------------------------------
    def student(self, model, condition):
        return lambda x, sigma: self.adaptation.student_velocity(model, x, sigma, condition)

    def teacher(self, condition):
        return lambda x, sigma: self.adaptation.teacher_velocity(x, sigma, condition)


def fingerprint(tensors) -> torch.Tensor:
    """(element count, sum, sum of squares) of whole tensors, in float64: equal weights give equal fingerprints."""
    total = torch.zeros(3, dtype=torch.float64)
    for t in tensors:
        t = t.detach().double().cpu()
        total += torch.stack([torch.tensor(float(t.numel()), dtype=torch.float64), t.sum(), t.square().sum()])
    return total


AFTER_DIVERGING = "the last checkpoint is kept; lower --learning_rate (or --max_grad_norm) and resume with --resume_from_checkpoint latest."


def diverged(what: str, step: int) -> UserError:
    return UserError(f"{what} at step {step}: training stopped before it reached the weights, {AFTER_DIVERGING}")


def weight_fingerprints(adaptation) -> torch.Tensor:
    """Fingerprints of the whole student and teacher, one row each (collective)."""
    return torch.stack([adaptation.fingerprint("student"), adaptation.fingerprint("teacher")])


def check_finite(prints: torch.Tensor, step: int, what: str):
    """Never write non-finite weights: a checkpoint, once written, is one a run can resume from."""
    for role, row in zip(("student", "teacher"), prints):
        if not torch.isfinite(row).all():
            raise UserError(f"the {role} weights are not finite at step {step}, so {what} was not written: {AFTER_DIVERGING}")


def check_ranks_agree(accelerator, adaptation, prints: torch.Tensor):
    """Every rank must end with the same whole student and teacher, and none may be empty or missing elements: the
    fingerprints of the gathered weights (`weight_fingerprints`) are compared across ranks and their element counts
    with the model's."""
    prints = prints.to(accelerator.device)
    gathered = accelerator.gather(prints[None]).view(accelerator.num_processes, 2, 3).cpu()
    expected = torch.tensor([adaptation.expected_numel("student"), adaptation.expected_numel("teacher")], dtype=torch.float64)
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)) or not torch.equal(gathered[0, :, 0], expected):
        raise RuntimeError(f"ranks disagree on the weights or hold incomplete ones (elements, sum, sum of squares per rank "
                           f"and role: {gathered.tolist()}; expected elements {expected.tolist()}): please report this.")
    if accelerator.num_processes > 1:
        logger.info("student and teacher identical on all %d ranks", accelerator.num_processes)


def optimize(run: Run, model, optimizer, lr_scheduler, batches, noise_generator, step: int, log_file: Path) -> int:
    """D-OPSD (or SFT) optimizer steps from `step` to --max_train_steps, with the EMA teacher, logs, checkpoints and
    validation; returns the last step done."""
    from tqdm.auto import tqdm

    args, accelerator, family, adaptation, engine = run.args, run.accelerator, run.family, run.adaptation, run.engine
    progress = tqdm(range(args.max_train_steps), initial=step, desc="steps", disable=not accelerator.is_local_main_process)
    while step < args.max_train_steps:
        losses = []
        for _ in range(args.gradient_accumulation_steps):
            indices, column = next(batches)
            examples = [run.examples[i] for i in indices]
            width, height = examples[0].size
            student_condition = family.collate([run.conditions.student(caption_of(e, column), e) for e in examples], run.device)
            noise = family.initial_noise(len(indices), height, width, noise_generator, run.device)
            if args.method == "dopsd":
                teacher_condition = family.collate([run.conditions.teacher(i, caption_of(e, column)) for i, e in zip(indices, examples)], run.device)
                sigmas = training_rollout_sigmas(family, args, height, width, run.device)
                with adaptation.training():
                    losses.append(dopsd_step(run.student(model, student_condition), run.teacher(teacher_condition), noise, sigmas,
                                             args.loss_space, accelerator.backward, lambda: accelerator.accumulate(model)))
            else:
                x0 = torch.stack([run.conditions.latents(i) for i in indices]).to(run.device)
                sigma = sample_sft_sigmas(family, len(indices), height, width, noise_generator, run.device)
                with adaptation.training(), accelerator.accumulate(model):
                    losses.append([sft_step(run.student(model, student_condition), x0, noise, sigma, accelerator.backward)])
        per_state = torch.stack([torch.stack(l) for l in losses]).mean(0)
        loss = accelerator.gather(per_state.mean()[None]).mean().item()
        if not math.isfinite(loss):
            progress.close()
            raise diverged(f"the loss is {loss}", step + 1)
        clipped = accelerator.clip_grad_norm_(adaptation.trainable_parameters(), args.max_grad_norm)
        if clipped is not None and not math.isfinite(float(clipped)):  # stop before the step writes it into the weights
            progress.close()
            raise diverged(f"the gradient norm is {float(clipped)}", step + 1)
        optimizer.step()
        grad_norm = engine.grad_norm(model, clipped)  # DeepSpeed clips inside its engine and knows the norm after its step
        if grad_norm is not None and not math.isfinite(grad_norm):  # (stepped already: nothing of it is ever saved)
            progress.close()
            raise diverged(f"the gradient norm is {grad_norm}", step + 1)
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        adaptation.update_teacher()
        step = run.step = step + 1

        logs = {"loss": loss, "lr": lr_scheduler.get_last_lr()[0]}
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        logs.update({f"loss_state_{k}": float(v) for k, v in enumerate(per_state)} if args.method == "dopsd" else {})
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4g}", **({"states": " ".join(f"{v:.2g}" for v in per_state.tolist())} if args.method == "dopsd" else {}),
                             lr=f"{logs['lr']:.2g}")
        accelerator.log(logs, step=step)
        if accelerator.is_main_process:
            with open(log_file, "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")

        if step % args.checkpointing_steps == 0:
            check_finite(weight_fingerprints(adaptation), step, f"checkpoint-{step}")
            state = {
                "step": step,
                "args": public_args(args),
                "batches": accelerator.gather_for_metrics([batches.state_dict()], use_gather_object=True),
                "noise_generator": accelerator.gather_for_metrics([noise_generator.get_state().tolist()], use_gather_object=True),
            }
            save_checkpoint(accelerator, args, step, state, **engine.save_state_kwargs(adaptation.frozen_base))
        if args.validation_steps and step % args.validation_steps == 0 and step < args.max_train_steps and accelerator.is_main_process:
            validate(run, step)

    return step


def train(args, family_cls, adaptation_cls):
    """Load, cache conditions, then optimise: D-OPSD (or SFT) steps, EMA teacher, checkpoints, validation, save."""
    from diffusers.optimization import get_scheduler

    refuse_earlier_run(args)
    resume = resolve_resume(args)
    if resume is not None:  # refused here, before anything loads, if it would train another model
        state = json.loads((resume / "training_state.json").read_text())
        changed = check_resume_matches(args, state, int(os.environ.get("WORLD_SIZE", "1")))
    run = Run(args, family_cls, adaptation_cls)
    accelerator, adaptation = run.accelerator, run.adaptation
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.preview_teacher_only:
        if accelerator.is_main_process:
            preview_teacher(run)
        return

    engine = run.engine
    optimizer = make_optimizer(args, adaptation.trainable_parameters(), engine_owns_step=engine.owns_gradient_clipping)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(run.transformer, optimizer, lr_scheduler)
    adaptation.use_prepared(model, engine)
    report(engine, **adaptation.parameter_groups())
    batches = BucketBatches(run.examples, args.train_batch_size, args.seed, accelerator.num_processes, accelerator.process_index)
    noise_generator = torch.Generator(run.device).manual_seed(args.seed * 1000 + accelerator.process_index)

    step = 0
    if resume is not None:
        accelerator.load_state(str(resume), **engine.load_state_kwargs(adaptation.frozen_base))
        step = state["step"]
        batches.load_state_dict(state["batches"][accelerator.process_index])
        noise_generator.set_state(torch.tensor(state["noise_generator"][accelerator.process_index], dtype=torch.uint8))
        if accelerator.is_main_process:
            for log in ("loss_log.jsonl", "validation_log.jsonl"):
                forget_after(output_dir / log, step)
        logger.info("resumed from %s at step %d", resume, step)

    if accelerator.is_main_process:
        save_args(args, output_dir, **({"resumed_at": step, "changed": changed} if resume is not None else {}))
        accelerator.init_trackers("dopsd", config={k: v for k, v in public_args(args).items() if isinstance(v, (int, float, str, bool))})
        if step == 0 and run.validates:
            validate(run, 0)  # the untouched base column, and what the teacher draws before any training
    log_file = output_dir / "loss_log.jsonl"
    run.step = step
    try:
        step = optimize(run, model, optimizer, lr_scheduler, batches, noise_generator, step, log_file)
    except KeyboardInterrupt:
        done = checkpoint_dirs(args.output_dir)
        raise UserError(f"interrupted at step {run.step}: resume with --resume_from_checkpoint latest "
                        f"({'from ' + done[-1].name if done else 'no checkpoint yet: it starts over'}).", exit_code=130) from None

    accelerator.wait_for_everyone()
    prints = weight_fingerprints(adaptation)
    check_finite(prints, step, "the final weights")
    check_ranks_agree(accelerator, adaptation, prints)
    save_final_outputs(accelerator, adaptation, output_dir)
    samples = []
    if accelerator.is_main_process:
        if not args.skip_final_validation:
            samples = validate(run, step)
        write_model_card(args, family_cls, output_dir, samples, trigger_words(run.examples, args.instance_prompt),
                         adaptation.kind, training_caption=run.examples[0].captions[0] if run.examples else None)
        if args.push_to_hub:
            push_to_hub(args, output_dir)
    accelerator.end_training()
