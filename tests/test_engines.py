"""The sharded engines, run for real: FSDP2 and DeepSpeed ZeRO-2/3 on two gloo ranks of this CPU (tests/cpu_engines.py
makes accelerate build them here), for both scripts and both families.

One module fixture runs every case once (about two minutes); the tests then read what the runs wrote: which engine
really ran and what each rank held, the saved weights against plain data parallel's, the EMA relation between the
checkpointed teachers and students, resumed runs against uninterrupted ones, a deliberately slow rank at checkpoint
time, bf16 under the shipped configs, and the stock pipelines loading the results.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

ENGINES = {  # accelerate config -> the engine that must really run
    "ddp": ("configs/ddp.yaml", "data parallel"),
    "zero2": ("configs/deepspeed_zero2.yaml", "DeepSpeed ZeRO-2"),
    "zero3": ("tests/engine_configs/zero3_partitioned.yaml", "DeepSpeed ZeRO-3"),
    "fsdp": ("configs/fsdp_{family}.yaml", "FSDP2"),
}
SHARDED = ("zero3", "fsdp")
FAMILIES = {"klein": ("flux2-klein", "flux2_klein"), "zimage": ("z-image", "z_image")}
DECAY = 0.5
# fp32 and no clipping difference between engines: the shipped ZeRO-2 config clips at 1.0, so every case does.
COMMON = ["--resolution", "64", "--validation_steps", "0", "--skip_final_validation", "--report_to", "none",
          "--max_train_steps", "2", "--checkpointing_steps", "1", "--gradient_accumulation_steps", "1",
          "--ema_decay", DECAY, "--max_grad_norm", "1.0", "--learning_rate", "1e-3", "--seed", "3"]


MAIN_CASES = [f"{s}-{f}-{e}" for s in ("full", "lora") for f in FAMILIES for e in ENGINES]
# Rank 1 finishes its part of every checkpoint a second after rank 0 (cpu_engines.py): every engine, script and family.
SLOW_SAVES = [n for n in MAIN_CASES if n.endswith("ddp")] + ["full-klein-fsdp", "lora-klein-zero3", "full-zimage-zero2",
                                                             "lora-zimage-fsdp", "full-zimage-zero3", "lora-klein-zero2"]


BF16_CASES = ["full-klein-zero3-bf16", "full-zimage-zero2-bf16", "lora-zimage-zero2-bf16", "full-klein-fsdp-bf16"]
# Training options that meet the engines' own machinery, each of which must still end as data parallel does: two
# micro-batches per optimizer step, each with one backward per rollout state (DeepSpeed counts its own accumulation
# boundaries, FSDP2 syncs only at the last backward), and activation checkpointing of sharded blocks.
VARIANTS = {"ga2": ["--gradient_accumulation_steps", "2"], "gc": ["--gradient_checkpointing"]}
VARIANT_CASES = ["full-klein-ddp-ga2", "full-klein-zero2-ga2", "lora-klein-ddp-ga2", "lora-klein-fsdp-ga2",
                 "full-klein-ddp-gc", "full-klein-fsdp-gc", "full-klein-zero3-gc"]


def case_args(tiny_models, sample_data, script, family, out, mixed_precision="no", *extra):
    folder = FAMILIES[family][0]
    args = ["--pretrained_model_name_or_path", tiny_models / folder, "--instance_data_dir", sample_data,
            "--output_dir", out, "--mixed_precision", mixed_precision, *COMMON, *extra]
    if family == "zimage":
        args += ["--teacher_vlm_name_or_path", tiny_models / "qwen3-vl-teacher"]
    if script == "lora":
        args += ["--rank", "4", "--lora_alpha", "4"]
    return [str(a) for a in args]


def make_cases(tiny_models, sample_data, root):
    cases = []

    def add(name, script, family, engine, *extra, mixed_precision="no", config=None, **fields):
        config = config or ENGINES[engine][0].format(family=FAMILIES[family][1])
        cases.append({"name": name, "script": f"train_dopsd_{script}", "config": config,
                      "argv": case_args(tiny_models, sample_data, script, family, root / name, mixed_precision, *extra),
                      "expect": ENGINES[engine][1], **fields})

    for script in ("full", "lora"):
        for family in FAMILIES:
            for engine in ENGINES:
                name = f"{script}-{family}-{engine}"
                add(name, script, family, engine, **({"slow_save_rank": 1} if name in SLOW_SAVES else {}))
    # Resumed from checkpoint-1 of the run above: must end as it did.
    for name in ("full-klein-zero2", "full-zimage-zero3", "full-klein-fsdp", "lora-klein-zero3", "lora-zimage-fsdp"):
        script, family, engine = name.split("-")
        add(f"{name}-resumed", script, family, engine, "--resume_from_checkpoint", root / name / "checkpoint-1")
    # bf16, which the shipped configs ask for.
    for name in BF16_CASES:
        script, family, engine, _ = name.split("-")
        add(name, script, family, engine, mixed_precision="bf16")
    for name in VARIANT_CASES:
        script, family, engine, variant = name.split("-")
        add(name, script, family, engine, *VARIANTS[variant])
    # Refusals, before anything loads.
    add("refuse-clipping", "lora", "klein", "zero2", "--max_grad_norm", "0.5")  # the later flag wins
    return cases


@pytest.fixture(scope="module")
def runs(tiny_models, sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    cases = make_cases(tiny_models, sample_data, root)
    (root / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "cpu_engines.py"), str(root / "cases.json"), str(root / "results")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return Runs(root, {case["name"]: case for case in cases})


class Runs:
    def __init__(self, root, cases):
        self.root, self.cases = root, cases

    def record(self, name, rank=0):
        return json.loads((self.root / "results" / f"{name}.rank{rank}.json").read_text())

    def log(self, name, rank=0):
        return (self.root / "results" / f"{name}.rank{rank}.log").read_text()

    def ok(self, name):
        for rank in (0, 1):
            record = self.record(name, rank)
            assert record["ok"], f"{name} rank {rank}: {record['error']}\n{record.get('traceback', '')[-3000:]}\n{self.log(name, rank)[-3000:]}"
        return self.root / name

    def student(self, name, step=None):
        """The student's whole weights: the final output, or a checkpoint's for LoRA (full checkpoints hold the engine's
        own sharded format; their teachers are whole)."""
        out = self.ok(name)
        if name.startswith("full"):
            assert step is None
            return load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
        folder = out if step is None else out / f"checkpoint-{step}"
        return load_file(folder / "pytorch_lora_weights.safetensors")

    def teacher(self, name, step):
        folder = self.ok(name) / f"checkpoint-{step}"
        if name.startswith("full"):
            return load_file(folder / "teacher" / "diffusion_pytorch_model.safetensors")
        return load_file(folder / "teacher_lora_weights.safetensors")


def all_close(a, b, **tolerance):
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=lambda m: f"{key}: {m}", **tolerance)




@pytest.mark.parametrize("name", MAIN_CASES)
def test_the_asked_engine_really_runs_and_shards(runs, name):
    runs.ok(name)
    reports = [runs.record(name, rank)["engine"] for rank in (0, 1)]
    assert all(r["engine"] == runs.cases[name]["expect"] and r["processes"] == 2 for r in reports)
    for group in ("student", "teacher"):
        held, whole = [r[f"{group}_bytes"] for r in reports], reports[0][f"{group}_whole_bytes"]
        assert 0 < reports[0][f"{group}_largest_bytes"] < whole
        if name.split("-")[2] in SHARDED:  # each rank holds its own part, and together the whole (plus padding)
            assert all(h < 0.55 * whole for h in held) and whole <= sum(held) < whole + 4096, (group, held, whole)
        else:
            assert held == [whole, whole], (group, held, whole)
    assert "student and teacher identical on all 2 ranks" in runs.log(name)


@pytest.mark.parametrize("name", [n for n in MAIN_CASES if not n.endswith("ddp")])
def test_every_engine_ends_with_the_weights_of_data_parallel(runs, name):
    ddp = name.rsplit("-", 1)[0] + "-ddp"
    # Up to the order of the gradient reductions: Adam turns a rounding difference in a near-zero gradient into up to
    # a hundredth of its step (lr 1e-3); a missed sync, a wrong EMA source or a lost shard is a whole step or more.
    all_close(runs.student(name), runs.student(ddp), rtol=1e-5, atol=1e-5)
    for step in (1, 2):
        all_close(runs.teacher(name, step), runs.teacher(ddp, step), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MAIN_CASES + BF16_CASES)
def test_the_teacher_is_the_ema_of_the_students_fp32_weights(runs, name, tiny_models):
    """teacher_k = d * teacher_(k-1) + (1 - d) * student_k at every checkpoint, teacher_0 the starting weights. The
    student is the fp32 master: under DeepSpeed bf16 an EMA of its bf16 module copy misses this by bf16 rounding."""
    start_teacher = runs.teacher(name, 1)
    student = runs.student(name)
    for key, t2 in runs.teacher(name, 2).items():
        assert t2.dtype == torch.float32 and student[key].dtype == torch.float32
        torch.testing.assert_close(t2, DECAY * start_teacher[key] + (1 - DECAY) * student[key], rtol=1e-6, atol=1e-7)
    if name.startswith("lora"):  # the teacher adapter starts as the student's, whose lora_B starts at zero
        student_1 = runs.student(name, 1)
        up = [key for key in start_teacher if "lora_B" in key]
        assert up and all(torch.equal(start_teacher[k], (1 - DECAY) * student_1[k]) for k in up)
    elif name.endswith("ddp"):  # data parallel checkpoints hold the whole student too
        start = load_file(tiny_models / FAMILIES[name.split("-")[1]][0] / "transformer" / "diffusion_pytorch_model.safetensors")
        student_1 = load_file(runs.root / name / "checkpoint-1" / "model.safetensors")
        all_close(start_teacher, {k: DECAY * start[k] + (1 - DECAY) * student_1[k] for k in start}, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in VARIANT_CASES if "-ddp-" not in n])
def test_accumulation_and_checkpointing_end_as_data_parallel_under_every_engine(runs, name):
    script, family, engine, variant = name.split("-")
    ddp = f"{script}-{family}-ddp-{variant}"
    assert runs.record(name)["engine"]["engine"] == runs.cases[name]["expect"]
    if variant == "ga2":
        assert "x 2 accumulated" in runs.log(name) and "x 2 accumulated" in runs.log(ddp)
    all_close(runs.student(name), runs.student(ddp), rtol=1e-5, atol=1e-5)
    for step in (1, 2):
        all_close(runs.teacher(name, step), runs.teacher(ddp, step), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["full-klein-zero2", "full-zimage-zero3", "full-klein-fsdp", "lora-klein-zero3", "lora-zimage-fsdp"])
def test_a_resumed_run_ends_as_the_uninterrupted_one(runs, name):
    resumed = f"{name}-resumed"
    assert "resumed from" in runs.log(resumed)
    all_close(runs.student(resumed), runs.student(name), rtol=0, atol=0)
    all_close(runs.teacher(resumed, 2), runs.teacher(name, 2), rtol=0, atol=0)


@pytest.mark.parametrize("name", SLOW_SAVES)
def test_a_slow_rank_finishes_its_checkpoint_before_it_is_renamed(runs, name):
    out = runs.ok(name)
    for step in (1, 2):
        assert (out / f"checkpoint-{step}" / "slow_rank_1_was_here").exists()
    assert not list(out.glob(".partial-*"))


@pytest.mark.parametrize("name", BF16_CASES)
def test_bf16_under_the_engines_trains_and_saves_the_fp32_masters(runs, name, tiny_models):
    student, fp32 = runs.student(name), runs.student(name.replace("-bf16", "").rsplit("-", 1)[0] + "-ddp")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in student.values())
    # The fp32 masters, not DeepSpeed's bf16 module copy: almost no value is a bf16 number.
    rounded = sum(int((v.to(torch.bfloat16).float() == v).sum()) for v in student.values())
    assert rounded < 0.01 * sum(v.numel() for v in student.values())
    # It trained like the fp32 run: the same size of update, roughly the same way (these tiny random models' gradients
    # are near bf16's resolution, and Adam normalises that noise into full-size steps: only roughly).
    if name.startswith("full"):
        start = load_file(tiny_models / FAMILIES[name.split("-")[1]][0] / "transformer" / "diffusion_pytorch_model.safetensors")
    else:
        student, fp32 = ({k: v for k, v in d.items() if "lora_B" in k} for d in (student, fp32))
        start = {k: torch.zeros_like(v) for k, v in student.items()}
    moved, moved_fp32 = (torch.cat([(d[k] - start[k]).flatten() for k in sorted(student)]) for d in (student, fp32))
    assert 0.5 < moved.norm() / moved_fp32.norm() < 2 and torch.nn.functional.cosine_similarity(moved, moved_fp32, dim=0) > 0.2


@pytest.mark.parametrize("name", ["full-zimage-zero3", "full-klein-fsdp", "lora-klein-zero3", "lora-zimage-fsdp"])
def test_the_stock_pipelines_load_what_the_sharded_engines_saved(runs, name, tiny_models):
    from diffusers import DiffusionPipeline

    out = runs.ok(name)
    base = tiny_models / FAMILIES[name.split("-")[1]][0]
    if name.startswith("full"):
        config = json.loads((out / "transformer" / "config.json").read_text())
        assert not config["_class_name"].startswith("FSDP")
        pipe = DiffusionPipeline.from_pretrained(str(base), dtype=torch.float32)
        transformer = type(pipe.transformer).from_pretrained(out / "transformer")
        assert transformer.dtype == torch.float32
        pipe.transformer = transformer
    else:
        pipe = DiffusionPipeline.from_pretrained(str(base), dtype=torch.float32)
        pipe.load_lora_weights(str(out))
    image = pipe(prompt="a photo of [V] toy", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_a_clipping_conflict_with_the_deepspeed_config_is_refused(runs):
    record = runs.record("refuse-clipping")
    assert not record["ok"] and "--max_grad_norm is 0.5" in record["error"]
    assert not (runs.root / "refuse-clipping").exists()


def test_fsdp1_is_refused():
    """(accelerate cannot build FSDP1 on a CPU at all, so this asks engine_for about an accelerator that reports it.)"""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from dopsd_args import UserError
    from dopsd_engines import Fsdp2, engine_for

    def accelerator(version):
        return SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))

    with pytest.raises(UserError, match="fsdp_version: 2"):
        engine_for(accelerator(1))
    assert isinstance(engine_for(accelerator(2)), Fsdp2)


def test_a_dropped_engine_is_refused_in_one_line(monkeypatch):
    """Without the CPU driver, accelerate 1.15 builds data parallel for an FSDP or DeepSpeed launch on a CPU."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    from dopsd_args import UserError
    from dopsd_engines import engine_for

    for variable, engine in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        monkeypatch.setenv(variable, "true")
        try:
            with pytest.raises(UserError, match=f"asked for {engine} but accelerate set up NO"):
                engine_for(Accelerator(cpu=True))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            PartialState._reset_state()
        monkeypatch.delenv(variable)


def test_fingerprints_count_elements_so_empty_weights_cannot_pass():
    from dopsd_training import fingerprint

    weights = [torch.ones(3, 2), torch.zeros(4)]
    assert fingerprint(weights)[0] == 10
    # zeros and empty tensors add nothing to sum and sum of squares: only the element count tells them apart
    assert not torch.equal(fingerprint(weights), fingerprint([torch.ones(3, 2), torch.zeros(0)]))
