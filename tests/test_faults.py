"""Nothing leaks, nothing is lost: secrets, one run per output folder, finite checkpoints, and the faults of long jobs
(Ctrl-C, a full disk, a torn log, an incomplete checkpoint, a resume that would train another model)."""

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import dopsd_outputs
import train_dopsd_lora
from conftest import REPO
from dopsd_args import UserError
from dopsd_outputs import check_resume_matches, claim_output_dir
from test_train_lora import FAST, run

TOKEN = "hf_dopsdTestSecret0123456789"


@pytest.fixture
def klein_args(tiny_models, sample_data):
    def make(out, *extra):
        return [str(a) for a in ["--pretrained_model_name_or_path", tiny_models / "flux2-klein", "--instance_data_dir",
                                 sample_data, "--output_dir", out, "--learning_rate", 1e-3, "--max_train_steps", 2,
                                 "--checkpointing_steps", 1, "--gradient_accumulation_steps", 1, *FAST, *extra]]
    return make


def train(argv):
    """train_dopsd_lora in this process (for faults injected with monkeypatch); the lock is let go afterwards."""
    try:
        train_dopsd_lora.main(argv)
    finally:
        if dopsd_outputs._held_lock is not None:
            dopsd_outputs._held_lock.close()
            dopsd_outputs._held_lock = None


def error_line(result):
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_the_hub_token_reaches_no_file_and_no_tracker(klein_args, tmp_path):
    out = tmp_path / "out"
    argv = klein_args(out, "--hub_token", TOKEN, "--validation_steps", 1)
    argv[argv.index("--report_to") + 1] = "tensorboard"
    argv.remove("--skip_final_validation")
    result = run(argv)
    assert list(out.rglob("events.out.tfevents.*")) and list(out.rglob("hparams.yml"))
    leaks = [p for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaks and TOKEN not in result.stdout + result.stderr


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(klein_args, tmp_path):
    out = tmp_path / "out"
    run(klein_args(out))
    log = (out / "loss_log.jsonl").read_text()
    again = run(klein_args(out, "--seed", 7), check=False)
    assert again.returncode == 2 and "holds an earlier run" in error_line(again) and "--overwrite_output_dir" in error_line(again)
    assert (out / "loss_log.jsonl").read_text() == log and json.loads((out / "args.json").read_text())["seed"] == 0
    run(klein_args(out, "--seed", 7, "--max_train_steps", 1, "--overwrite_output_dir"))
    assert len((out / "loss_log.jsonl").read_text().splitlines()) == 1 and not (out / "checkpoint-2").exists()
    assert json.loads((out / "args.json").read_text())["seed"] == 7


def test_a_second_run_into_a_folder_in_use_is_refused(klein_args, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import argparse, time; "
                               "from dopsd_outputs import claim_output_dir; claim_output_dir(argparse.Namespace(output_dir=sys.argv[2], "
                               "resume_from_checkpoint=None, overwrite_output_dir=False, preview_teacher_only=False)); "
                               "print('held', flush=True); time.sleep(60)", str(REPO), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = run(klein_args(out), check=False)
        assert second.returncode == 2 and "another run is writing" in error_line(second) and f"pid {holder.pid}" in error_line(second)
    finally:
        holder.kill()
        holder.wait()
    run(klein_args(out))  # the lock dies with its process


@pytest.mark.parametrize("poisoned_step", [1, 2])
def test_non_finite_weights_never_reach_a_checkpoint(klein_args, tmp_path, monkeypatch, poisoned_step):
    """An update that leaves the loss finite but a weight NaN: the checkpoint of that step is not written."""
    calls = []
    step = torch.optim.AdamW.step

    def poisoning_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == poisoned_step:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=f"not finite at step {poisoned_step}, so checkpoint-{poisoned_step} was not written"):
        train(klein_args(out, "--max_train_steps", 3))
    assert [d.name for d in dopsd_outputs.checkpoint_dirs(out)] == [f"checkpoint-{s}" for s in range(1, poisoned_step)]
    for d in dopsd_outputs.checkpoint_dirs(out):
        assert all(torch.isfinite(v).all() for f in d.glob("*.safetensors") for v in load_file(f).values())
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not list(out.glob(".partial-*"))


def test_a_non_finite_gradient_stops_before_the_optimizer_step(klein_args, tmp_path, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, params, norm: torch.tensor(float("inf")))
    stepped = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: stepped.append(1))
    with pytest.raises(UserError, match="gradient norm is inf at step 1: training stopped before it reached the weights"):
        train(klein_args(tmp_path / "out"))
    assert not stepped


@pytest.mark.parametrize("at", ["checkpoint", "final"])
def test_a_full_disk_leaves_nothing_half_written_and_says_where_to_resume(klein_args, tmp_path, monkeypatch, at):
    from accelerate import Accelerator

    def full_disk(path):
        with open(path, "wb") as f:  # a torn file, as a full disk leaves one
            f.write(b"torn")
        raise OSError(errno.ENOSPC, "No space left on device")

    if at == "checkpoint":
        save_state = Accelerator.save_state

        def save_state_once(self, output_dir=None, **kwargs):
            if output_dir.endswith("checkpoint-2"):
                os.makedirs(output_dir, exist_ok=True)
                full_disk(os.path.join(output_dir, "model.safetensors"))
            return save_state(self, output_dir, **kwargs)

        monkeypatch.setattr(Accelerator, "save_state", save_state_once)
        expected = r"could not write checkpoint-2 \(No space left on device\): free space under .*the last complete checkpoint is .*checkpoint-1"
    else:
        monkeypatch.setattr(train_dopsd_lora.LoraAdaptation, "save_final", lambda self, d: full_disk(d / "pytorch_lora_weights.safetensors"))
        expected = "could not write the final weights .*the last complete checkpoint is .*checkpoint-2"
    out = tmp_path / "out"
    with pytest.raises(UserError, match=expected):
        train(klein_args(out))
    assert not list(out.glob(".partial-*")) and not (out / "pytorch_lora_weights.safetensors").exists()
    assert dopsd_outputs.checkpoint_dirs(out)[-1].name == ("checkpoint-1" if at == "checkpoint" else "checkpoint-2")


def test_ctrl_c_ends_in_one_line_that_says_where_to_resume(klein_args, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "train_dopsd_lora.py"), *klein_args(out, "--max_train_steps", 1000)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-2").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert process.returncode == 130, stderr[-3000:]
    line = error_line(result)
    assert line.startswith("error: interrupted at step ") and "--resume_from_checkpoint latest (from checkpoint-" in line
    assert "Traceback" not in stderr and not list(out.glob(".partial-*"))
    run(klein_args(out, "--max_train_steps", dopsd_outputs.checkpoint_dirs(out)[-1].name.split("-")[1], "--resume_from_checkpoint", "latest"))


def test_a_resume_survives_a_torn_log_and_passes_over_an_incomplete_checkpoint(klein_args, tmp_path):
    out = tmp_path / "out"
    run(klein_args(out, "--max_train_steps", 1))
    with open(out / "loss_log.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a writer killed mid-line
    (out / "checkpoint-9").mkdir()  # copied in part: no training_state.json
    result = run(klein_args(out, "--resume_from_checkpoint", "latest"))
    assert "resumed from" in result.stderr and "checkpoint-1" in result.stderr and "checkpoint-9 has no training_state.json" in result.stderr
    rows = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    resumes = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert resumes == [{"step": 1, "changed": {"max_train_steps": [1, 2], "resume_from_checkpoint": [None, "latest"]}}]


@pytest.fixture(scope="module")
def one_step_run(tiny_models, sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_step") / "out"
    run(["--pretrained_model_name_or_path", tiny_models / "flux2-klein", "--instance_data_dir", sample_data, "--output_dir", out,
         "--learning_rate", 1e-3, "--max_train_steps", 1, "--checkpointing_steps", 1, "--gradient_accumulation_steps", 1, *FAST])
    return out


@pytest.mark.parametrize("flag,value", [("--rollout_steps", "2"), ("--rank", "8"), ("--seed", "5"), ("--method", "sft"),
                                        ("--ema_decay", "0.9"), ("--loss_space", "velocity"), ("--resolution", "128")])
def test_a_resume_that_would_train_another_model_is_refused(one_step_run, flag, value):
    out = one_step_run
    args = argparse.Namespace(**json.loads((out / "args.json").read_text()))
    setattr(args, flag[2:], type(getattr(args, flag[2:]))(value))
    state = json.loads((out / "checkpoint-1" / "training_state.json").read_text())
    with pytest.raises(UserError, match=f"trained with {flag} .* this resume asks for {value}"):
        check_resume_matches(args, state, processes=1)


def test_a_resume_with_another_number_of_processes_is_refused(one_step_run):
    out = one_step_run
    state = json.loads((out / "checkpoint-1" / "training_state.json").read_text())
    with pytest.raises(UserError, match="written by 1 processes and this launch has 2"):
        check_resume_matches(argparse.Namespace(**json.loads((out / "args.json").read_text())), state, processes=2)


def test_a_refused_resume_stops_before_anything_loads_or_is_written(one_step_run, klein_args):
    out = one_step_run
    args_before = (out / "args.json").read_text()
    result = run(klein_args(out, "--rollout_steps", 2, "--resume_from_checkpoint", "latest"), check=False)
    assert result.returncode == 2 and "--rollout_steps 4 and this resume asks for 2" in error_line(result)
    assert (out / "args.json").read_text() == args_before and not (out / "resumes.jsonl").exists()
    assert "Loading pipeline components" not in result.stderr
