"""Mutation check: would the tests notice if what makes D-OPSD D-OPSD broke?

Each mutant below is one plausible bug in the method's code (the rollout, the loss, the EMA teacher, the schedules,
the families' conventions and teacher contexts, the adapter initialisation), written as an exact text replacement
inside one named function. The check copies the repository's files to a temporary folder, applies one mutant at a
time and runs the tests named for it (a targeted subset, so the whole check takes minutes). A mutant is *killed* when
those tests fail; one that *survives* is a bug the tests would let through, unless it is marked equivalent (it
cannot change what the code computes; the reason is given). The table goes between <!-- mutation:start --> and
<!-- mutation:end --> of BENCHMARKS.md; the exit status is 1 when a non-equivalent mutant survives.

    python tools/mutation_check.py                   # every mutant (minutes on 2 CPU cores)
    python tools/mutation_check.py --only dopsd_step # the mutants of one function
    python tools/mutation_check.py --list            # what the mutants are, without running them
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- mutation:start -->", "<!-- mutation:end -->"

METHOD = "tests/test_method.py"
RECIPE = "tests/test_recipe.py"


def method_tests(*names: str) -> tuple[str, ...]:
    return tuple(f"{METHOD}::test_{name}" for name in names)


# The tests that guard each function, run in this order (the quickest first). An equivalent mutant runs all of
# test_method.py and test_recipe.py instead: the stronger evidence that nothing notices it.
ROLLOUT_MATCHES_STOCK = "full_rollout_reproduces_the_stock_pipeline"
GUARDS = {
    "dopsd_training.py:dopsd_step": method_tests(
        "the_students_velocity_drives_the_rollout_and_both_see_its_states", "the_off_policy_ablation_trains_on_the_noised_ground_truth",
        "per_step_backward_equals_one_backward_and_teacher_gets_no_gradient", "the_returned_losses_hold_no_state_sized_buffers"),
    "dopsd_training.py:distillation_loss": method_tests(
        "x0_loss_is_the_velocity_loss_weighted_by_sigma_squared", "the_students_velocity_drives_the_rollout_and_both_see_its_states"),
    "pipeline_dopsd.py:x0_from_velocity": method_tests("flow_conventions_recover_the_clean_sample_and_reach_it"),
    "pipeline_dopsd.py:euler_step": method_tests("flow_conventions_recover_the_clean_sample_and_reach_it", ROLLOUT_MATCHES_STOCK),
    "dopsd_training.py:ema_update": method_tests("ema_arithmetic", "lora_teacher_ema_follows_the_student"),
    "pipeline_dopsd.py:rollout_sigmas": method_tests("zimage_schedule_is_the_reference_grid_at_real_size", ROLLOUT_MATCHES_STOCK),
    "pipeline_dopsd.py:ZImageFamily.velocity": method_tests(ROLLOUT_MATCHES_STOCK),
    "pipeline_dopsd.py:ZImageFamily.sigmas": method_tests("zimage_schedule_is_the_reference_grid_at_real_size", ROLLOUT_MATCHES_STOCK),
    "pipeline_dopsd.py:ZImageFamily.encode_teacher": method_tests(
        "zimage_teacher_context_is_the_vlms_second_to_last_layer_of_image_then_prompt", "zimage_teacher_encoder_swaps_the_language_model"),
    "pipeline_dopsd.py:QwenVLTeacherEncoder": method_tests(
        "zimage_teacher_context_is_the_vlms_second_to_last_layer_of_image_then_prompt", "zimage_teacher_encoder_swaps_the_language_model"),
    "pipeline_dopsd.py:Flux2KleinFamily": method_tests(
        "klein_schedule_is_the_inference_schedule", "klein_teacher_prompt_is_the_prompt_then_the_reference_suffix",
        "klein_teacher_prediction_is_the_editing_path", ROLLOUT_MATCHES_STOCK),
    "pipeline_dopsd.py:Flux2KleinFamily._reference_rollout_sigmas": (RECIPE,),
    "pipeline_dopsd.py:dreambooth_noise_levels": (RECIPE,),
    "dopsd_training.py:training_rollout_sigmas": (RECIPE,),
    "train_dopsd_lora.py:LoraAdaptation": method_tests(
        "teacher_starts_equal_to_student_and_a_same_context_teacher_teaches_nothing", "lora_factors_are_fp32_on_a_bf16_base",
        "adapter_switching_runs_the_adapter_peft_would", "per_step_backward_equals_one_backward_and_teacher_gets_no_gradient"),
}


@dataclass(frozen=True)
class Mutant:
    function: str  # "module.py:name" or "module.py:Class.name"
    what: str  # the bug, in words
    old: str  # text that occurs exactly once in the function
    new: str
    equivalent: str | None = None  # why the mutant cannot change what the code computes

    @property
    def path(self) -> str:
        return self.function.split(":")[0]

    @property
    def name(self) -> str:
        return self.function.split(":")[1]

    @property
    def tests(self) -> tuple[str, ...]:
        if self.equivalent:
            return METHOD, RECIPE
        # The most specific guard: the function's own, else its class's.
        return GUARDS.get(self.function) or GUARDS[self.function.rsplit(".", 1)[0]]


MUTANTS = [
    # -- the D-OPSD step
    Mutant("dopsd_training.py:dopsd_step", "the teacher's velocity advances the rollout (off-policy states)",
           "euler_step(x, sigma, sigma_next, v_student.detach())", "euler_step(x, sigma, sigma_next, v_teacher)"),
    Mutant("dopsd_training.py:dopsd_step", "the rollout starts from zeros instead of the noise",
           "x, losses = noise, []", "x, losses = torch.zeros_like(noise), []"),
    Mutant("dopsd_training.py:dopsd_step", "the teacher predicts at the next noise level",
           "v_teacher = teacher(x, sigma)", "v_teacher = teacher(x, sigma_next)"),
    Mutant("dopsd_training.py:dopsd_step", "the student predicts at the next noise level",
           "v_student = student(x, sigma)", "v_student = student(x, sigma_next)"),
    Mutant("dopsd_training.py:dopsd_step", "the teacher's forward builds a graph (no stop-gradient)",
           "with torch.no_grad():", "with contextlib.nullcontext():"),
    Mutant("dopsd_training.py:dopsd_step", "the velocity MSE whatever --loss_space asks",
           "v_student, v_teacher, loss_space)", 'v_student, v_teacher, "velocity")'),
    Mutant("dopsd_training.py:dopsd_step", "no backward per state",
           "                backward(loss)", "                pass"),
    Mutant("dopsd_training.py:dopsd_step", "the last state is never trained",
           "zip(sigmas[:-1], sigmas[1:])", "zip(sigmas[:-2], sigmas[1:-1])"),
    Mutant("dopsd_training.py:dopsd_step", "the off-policy ablation noises the wrong way round",
           "(1 - sigma) * off_policy_x0 + sigma * noise", "sigma * off_policy_x0 + (1 - sigma) * noise"),
    Mutant("dopsd_training.py:dopsd_step", "the state is not detached at the top of the loop",
           "x = x.detach() if off_policy_x0", "x = x if off_policy_x0",
           equivalent="the state is the noise or an Euler step with the detached student velocity: it never carries a graph"),
    Mutant("dopsd_training.py:dopsd_step", "the Euler step takes the undetached student velocity",
           "v_student.detach())", "v_student)",
           equivalent="the next iteration detaches the state before anything uses it, and the last state is not used"),
    # -- the loss
    Mutant("dopsd_training.py:distillation_loss", "the velocity MSE returned for --loss_space x0",
           'if loss_space == "x0":', 'if loss_space == "x0-space":'),
    Mutant("dopsd_training.py:distillation_loss", "student and teacher swapped in the x0 MSE",
           "x0_from_velocity(x, sigma, v_student), x0_from_velocity(x, sigma, v_teacher)",
           "x0_from_velocity(x, sigma, v_teacher), x0_from_velocity(x, sigma, v_student)",
           equivalent="the MSE is symmetric, and the teacher's side carries no graph either way"),
    Mutant("pipeline_dopsd.py:x0_from_velocity", "x0 = x + sigma * v (the Z-Image model's sign)",
           "return x - sigma * velocity", "return x + sigma * velocity"),
    Mutant("pipeline_dopsd.py:euler_step", "the Euler step runs the wrong way in sigma",
           "(sigma_next - sigma) * velocity", "(sigma - sigma_next) * velocity"),
    # -- the EMA teacher
    Mutant("dopsd_training.py:ema_update", "teacher <- (1 - d) * teacher + d * student",
           "student_params, 1.0 - decay)", "student_params, decay)"),
    Mutant("dopsd_training.py:ema_update", "the update is computed out of place and dropped",
           "torch._foreach_lerp_(", "torch._foreach_lerp("),
    Mutant("dopsd_training.py:ema_update", "the student's bf16 values are averaged without casting",
           "s.detach().to(t.dtype)", "s.detach()"),
    Mutant("dopsd_training.py:ema_update", "decay 1.0 still runs the update",
           "if decay >= 1.0 or", "if decay > 1.0 or",
           equivalent="a lerp with weight 0 returns the teacher bit for bit"),
    # -- the rollout grid
    Mutant("pipeline_dopsd.py:rollout_sigmas", "the trained states do not end at sigma 0",
           "torch.linspace(0, num_inference_steps, rollout_steps + 1)", "torch.linspace(0, num_inference_steps - 1, rollout_steps + 1)"),
    Mutant("pipeline_dopsd.py:rollout_sigmas", "states rounded down instead of to the nearest point",
           ".round().long()", ".long()"),
    Mutant("pipeline_dopsd.py:rollout_sigmas", "more states than inference steps accepted",
           "rollout_steps <= num_inference_steps:", "rollout_steps <= num_inference_steps + 1:"),
    # -- Z-Image-Turbo
    Mutant("pipeline_dopsd.py:ZImageFamily.velocity", "the transformer's time not flipped (sigma fed as t)",
           "timestep = (1 - sigma).expand", "timestep = sigma.expand"),
    Mutant("pipeline_dopsd.py:ZImageFamily.velocity", "the transformer's output not negated",
           "return -torch.stack(", "return torch.stack("),
    Mutant("pipeline_dopsd.py:ZImageFamily.sigmas", "one inference step too many",
           "get_default_z_image_sigmas(num_inference_steps)", "get_default_z_image_sigmas(num_inference_steps + 1)"),
    Mutant("pipeline_dopsd.py:ZImageFamily.sigmas", "the resolution shift mu not passed",
           "sigmas=get_default_z_image_sigmas(num_inference_steps), mu=mu,", "sigmas=get_default_z_image_sigmas(num_inference_steps),",
           equivalent="Z-Image-Turbo's scheduler shifts statically (use_dynamic_shifting false) and ignores mu"),
    Mutant("pipeline_dopsd.py:ZImageFamily.encode_teacher", "the teacher context of the prompt alone",
           "caption = self.teacher_encoder(prompt, image)", "caption = self.encode_student([prompt])[0]['caption']"),
    Mutant("pipeline_dopsd.py:QwenVLTeacherEncoder.__call__", "the VLM's last hidden layer instead of the second to last",
           "hidden_states[-2]", "hidden_states[-1]"),
    Mutant("pipeline_dopsd.py:QwenVLTeacherEncoder.__call__", "the prompt before the image",
           '[{"type": "image", "image": image}, {"type": "text", "text": prompt}]',
           '[{"type": "text", "text": prompt}, {"type": "image", "image": image}]'),
    Mutant("pipeline_dopsd.py:QwenVLTeacherEncoder.__call__", "no generation prompt after the user turn",
           "add_generation_prompt=True", "add_generation_prompt=False"),
    Mutant("pipeline_dopsd.py:QwenVLTeacherEncoder.__call__", "padding not removed",
           'return hidden[0][inputs["attention_mask"][0].bool()]', "return hidden[0]",
           equivalent="one conversation per call is never padded, so the mask keeps every token"),
    Mutant("pipeline_dopsd.py:QwenVLTeacherEncoder.from_pretrained", "the VLM keeps its own language model",
           "language_model.load_state_dict(source, strict=True)", "pass"),
    # -- FLUX.2-klein
    Mutant("pipeline_dopsd.py:Flux2KleinFamily.velocity", "the reference tokens before the noisy ones",
           'torch.cat([tokens, condition["reference_latents"].to(tokens.dtype)], dim=1)',
           'torch.cat([condition["reference_latents"].to(tokens.dtype), tokens], dim=1)'),
    Mutant("pipeline_dopsd.py:Flux2KleinFamily.velocity", "the prediction sliced from the end",
           "out[:, : height * width]", "out[:, -height * width :]"),
    Mutant("pipeline_dopsd.py:Flux2KleinFamily.velocity", "the reference tokens at the noisy tokens' positions",
           'torch.cat([ids, condition["reference_ids"].to(ids.device)], dim=1)', "torch.cat([ids, ids], dim=1)"),
    Mutant("pipeline_dopsd.py:Flux2KleinFamily.velocity", "the timestep fed as 1 - sigma",
           "timestep=sigma.expand(batch)", "timestep=(1 - sigma).expand(batch)"),
    Mutant("pipeline_dopsd.py:Flux2KleinFamily.sigmas", "the empirical mu for 1000 steps",
           "num_steps=num_inference_steps)", "num_steps=1000)"),
    Mutant("pipeline_dopsd.py:Flux2KleinFamily.sigmas", "the pre-shift grid ends at 0, not 1/N",
           "np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)", "np.linspace(1.0, 0.0, num_inference_steps)"),
    Mutant("pipeline_dopsd.py:Flux2KleinFamily.encode_teacher", "the teacher's text without the suffix",
           "[self.teacher_prompt(p) for p in prompts]", "list(prompts)"),
    Mutant("pipeline_dopsd.py:Flux2KleinFamily._with_references", "no reference image in the teacher's context",
           "condition.update(reference_latents=latents, reference_ids=ids)", "condition.update(reference_ids=ids)"),
    Mutant("pipeline_dopsd.py:Flux2KleinFamily.teacher_prompt", "the suffix dropped from the teacher prompt",
           'return f"{prompt} {self.teacher_prompt_suffix}".strip()', "return prompt"),
    Mutant("pipeline_dopsd.py:Flux2KleinFamily._reference_rollout_sigmas", "the reference grid with mu for the 4-step inference",
           "num_steps=rollout_steps)", "num_steps=4)"),
    Mutant("dopsd_training.py:training_rollout_sigmas", "--rollout_grid reference ignored",
           'if args.rollout_grid == "reference":', "if False:"),
    Mutant("pipeline_dopsd.py:dreambooth_noise_levels", "SFT noise levels from the 1000-step inference schedule (the old bug)",
           "scheduler.sigmas.to(device=device, dtype=torch.float32)", "family.schedule(1000, height, width, device)[:-1]"),
    # -- the LoRA adapters
    Mutant("train_dopsd_lora.py:LoraAdaptation.__init__", "no student -> teacher copy: the teacher starts from its own random A",
           "                teacher.copy_(student)", "                pass"),
    Mutant("train_dopsd_lora.py:LoraAdaptation.__init__", "LoRA factors left in the base's dtype (bf16 EMA)",
           "param.data = param.data.float()", "param.data = param.data"),
    Mutant("train_dopsd_lora.py:LoraAdaptation.__init__", "LoRA A initialised by peft's default instead of gaussian",
           'init_lora_weights="gaussian"', "init_lora_weights=True"),
    Mutant("train_dopsd_lora.py:LoraAdaptation._freeze_teacher", "the teacher adapter left trainable",
           "p.requires_grad_(False)", "p.requires_grad_(True)"),
    Mutant("train_dopsd_lora.py:LoraAdaptation.teacher_velocity", "the teacher runs the student's adapter",
           "self._activate(TEACHER)", "self._activate(STUDENT)"),
]


def function_span(source: str, name: str) -> tuple[int, int]:
    """Character offsets of the definition `name` ("f" or "Class.f") in `source`."""
    tree = ast.parse(source)
    parts, nodes = name.split("."), tree.body
    node = None
    for part in parts:
        node = next((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            raise ValueError(f"{name}: no such definition")
        nodes = node.body
    lines = source.splitlines(keepends=True)
    start = sum(len(line) for line in lines[: node.lineno - 1])
    return start, start + sum(len(line) for line in lines[node.lineno - 1 : node.end_lineno])


def mutate(source: str, mutant: Mutant) -> str:
    """The source with the mutant applied; a ValueError when its text is not exactly once in its function."""
    start, end = function_span(source, mutant.name)
    body = source[start:end]
    if body.count(mutant.old) != 1:
        raise ValueError(f"{mutant.function}: {mutant.old!r} occurs {body.count(mutant.old)} times (expected once): update the mutant")
    return source[:start] + body.replace(mutant.old, mutant.new) + source[end:]


def copy_repository(destination: Path):
    """The tracked and new (not ignored) files, as the tests see them."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for name in files:
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, str]:
    """(passed, the first failing test or the reason)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    try:
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    if result.returncode == 0:
        return True, ""
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.M)
    return False, failed.group(1) if failed else (result.stdout + result.stderr).strip().splitlines()[-1]


def table(rows: list[dict], total_s: float) -> str:
    killed = sum(r["status"] == "killed" for r in rows)
    equivalent = sum(r["status"] == "equivalent" for r in rows)
    survived = [r for r in rows if r["status"] == "SURVIVED"]
    lines = [
        "## Mutation check (`tools/mutation_check.py`)",
        "",
        f"{len(rows)} mutants of the method's code, each run against its targeted tests: **{killed} killed, "
        f"{len(survived)} survived, {equivalent} equivalent** (they cannot change what the code computes; why is given). "
        f"{total_s / 60:.1f} minutes on {os.cpu_count()} CPU cores. `python tools/mutation_check.py` reruns it and "
        "rewrites this table.",
        "",
        "| function | mutant | result | by / why | s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['function']}` | {r['what']} | {r['status']} | {r['detail']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def write_section(path: Path, text: str):
    block = f"{START}\n{text}\n{END}"
    content = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in content:
        content = content[: content.index(START)] + block + content[content.index(END) + len(END) :]
    else:
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(content)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="Run only the mutants of functions whose name contains this.")
    p.add_argument("--list", action="store_true", help="List the mutants and exit.")
    p.add_argument("--timeout", type=float, default=300, help="Seconds a mutant's tests may run before it counts as killed.")
    p.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md",
                   help="Markdown file whose mutation section receives the table (a run with --only writes nothing).")
    args = p.parse_args(argv)
    mutants = [m for m in MUTANTS if args.only is None or args.only in m.function]
    if args.list:
        for m in mutants:
            print(f"{m.function}: {m.what}" + (f" (equivalent: {m.equivalent})" if m.equivalent else ""))
        return 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dopsd-mutants-") as folder:
        root = Path(folder)
        copy_repository(root)
        originals = {m.path: (root / m.path).read_text() for m in mutants}
        mutated = {id(m): mutate(originals[m.path], m) for m in mutants}  # every mutant must apply before any runs
        suites = sorted({t.split("::")[0] for m in mutants for t in m.tests})
        passed, reason = run_tests(root, tuple(suites), args.timeout)
        if not passed:
            print(f"the unmutated code fails its tests ({reason}): fix that first.", file=sys.stderr)
            return 2
        rows = []
        for i, m in enumerate(mutants, 1):
            began = time.perf_counter()
            (root / m.path).write_text(mutated[id(m)])
            try:
                passed, reason = run_tests(root, m.tests, args.timeout)
            finally:
                (root / m.path).write_text(originals[m.path])
            if not passed:
                status, detail = "killed", f"`{reason}`"
            elif m.equivalent:
                status, detail = "equivalent", m.equivalent
            else:
                status, detail = "SURVIVED", "no test failed"
            rows.append({"function": m.function, "what": m.what, "status": status, "detail": detail,
                         "seconds": time.perf_counter() - began})
            print(f"[{i}/{len(mutants)}] {status:10s} {m.function}: {m.what} ({rows[-1]['seconds']:.0f} s)", flush=True)
    text = table(rows, time.perf_counter() - start)
    print("\n" + text)
    if args.only is None:
        write_section(args.output, text)
        print(f"\nwrote the mutation section of {args.output}")
    return 1 if any(r["status"] == "SURVIVED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
