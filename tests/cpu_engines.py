"""Test-only: run the training scripts under accelerate's own FSDP2 and DeepSpeed engines on a CPU, with gloo.

accelerate 1.15 builds these engines only for GPU-type setups: with `cpu=True` it keeps MULTI_CPU for an FSDP config
(`accelerate/state.py` promotes to FSDP only from MULTI_GPU-like types) and never selects DeepSpeed (`... and not cpu`).
`force_engines_on_cpu` does on a CPU what accelerate does on GPUs, and nothing more: for FSDP it sets the distributed
type and plugin after the state is built; for DeepSpeed it builds the state with `cpu=False` and a gloo process group
(DeepSpeed's CPU accelerator, `DS_ACCELERATOR=cpu`). The engines' own code then runs unchanged. Remove this module
once accelerate accepts MULTI_CPU for these engines.

    python tests/cpu_engines.py CASES.json RESULTS_DIR

runs each case of CASES.json (a list of {"name", "script", "config", "argv", "env"?, "processes"?, "slow_save_rank"?})
as its own fresh group of processes, forked from one parent that has imported the libraries once (a case then starts
in a fraction of a second instead of the ten seconds of a new interpreter, and no engine's global state leaks into the
next case).
Each rank gets the environment `accelerate launch --config_file CONFIG` would give it (computed by accelerate's own
launch code) and writes RESULTS_DIR/<name>.rank<k>.json: whether it ended normally, its error, the engine that
really ran and the parameter bytes each rank held; its output goes to RESULTS_DIR/<name>.rank<k>.log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINE_VARIABLES = ("ACCELERATE_", "FSDP_")


def launch_environment(config_file: str, num_processes: int = 2) -> dict[str, str]:
    """The ACCELERATE_* / FSDP_* variables `accelerate launch --config_file CONFIG --num_processes N` sets."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", config_file, "--num_processes", str(num_processes), "x.py"])
    args, defaults, mixed_precision_from_flag = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_flag else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(ENGINE_VARIABLES)}


def force_engines_on_cpu():
    """Patch Accelerator.__init__ so that an FSDP or DeepSpeed launch gets that engine on a CPU machine."""
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    original = accelerate.Accelerator.__init__
    if getattr(original, "forces_engines_on_cpu", False):
        return

    def init(self, *args, cpu=False, kwargs_handlers=None, **kwargs):
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            kwargs_handlers = [*(kwargs_handlers or []), InitProcessGroupKwargs(backend="gloo")]
            cpu = False
        original(self, *args, cpu=cpu, kwargs_handlers=kwargs_handlers, **kwargs)
        if os.environ.get("ACCELERATE_USE_FSDP", "false") == "true" and self.state.distributed_type != DistributedType.FSDP:
            plugin = FullyShardedDataParallelPlugin()
            if self.state.mixed_precision != "no":
                plugin.set_mixed_precision(self.state.mixed_precision)
            self.state.fsdp_plugin = plugin
            self.state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init.forces_engines_on_cpu = True
    accelerate.Accelerator.__init__ = init
    # DeepSpeed's CPU accelerator would first compile its shared-memory all-reduce (about 45 s): gloo does the same job.
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # (the attribute `deepspeed.comm.torch` is torch)


def slow_down_saves(seconds: float = 1.0):
    """This rank finishes its part of every checkpoint `seconds` after the others, and leaves a mark in the folder it
    wrote into: a checkpoint renamed before every rank is done loses the mark, or fails this rank."""
    import accelerate

    original = accelerate.Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        saved = original(self, output_dir, **kwargs)
        time.sleep(seconds)
        (Path(output_dir) / f"slow_rank_{self.process_index}_was_here").write_text("")
        return saved

    accelerate.Accelerator.save_state = save_state


def run_case(case: dict, results: Path, rank: int):
    import importlib

    if case.get("slow_save_rank") == rank:
        slow_down_saves()

    record = {"name": case["name"], "ok": True, "error": None}
    started = time.perf_counter()
    try:
        script = importlib.import_module(case["script"])
        script.main([str(a) for a in case["argv"]])
    except SystemExit as error:  # an argparse error
        record.update(ok=False, error=f"SystemExit {error.code}")
    except Exception as error:  # noqa: BLE001 -- the test reads what went wrong
        record.update(ok=False, error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-4000:])
    record["seconds"] = round(time.perf_counter() - started, 2)
    from dopsd_engines import last_report

    record["engine"] = last_report()
    (results / f"{case['name']}.rank{rank}.json").write_text(json.dumps(record, indent=1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fork_rank(case: dict, results: Path, rank: int, world: int, port: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        log = open(results / f"{case['name']}.rank{rank}.log", "w")
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        for key in [k for k in os.environ if k.startswith(ENGINE_VARIABLES)]:
            del os.environ[key]
        os.environ.update(launch_environment(str(REPO / case["config"]), world))
        os.environ.update(case.get("env", {}))
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        run_case(case, results, rank)
        code = 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_group(case: dict, results: Path, timeout: float):
    """All ranks of one case; a rank left waiting for a failed one is stopped shortly after it."""
    world = int(case.get("processes", 2))
    port = free_port()
    pids = {fork_rank(case, results, rank, world, port): rank for rank in range(world)}
    deadline = time.monotonic() + timeout
    while pids:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid in pids:
            rank = pids.pop(pid)
            record = results / f"{case['name']}.rank{rank}.json"
            if not record.exists() or not json.loads(record.read_text())["ok"]:
                deadline = min(deadline, time.monotonic() + 15)
            continue
        if time.monotonic() > deadline:
            for pid, rank in pids.items():
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                record = results / f"{case['name']}.rank{rank}.json"
                if not record.exists():
                    record.write_text(json.dumps({"name": case["name"], "ok": False, "error": "timed out", "engine": {}}))
            break
        time.sleep(0.05)


def main(cases_file: str, results_dir: str, timeout: str = "180"):
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(1)
    # Imported once here, before any thread or process group exists, so that every forked case starts at once.
    import deepspeed  # noqa: F401
    import train_dopsd_full  # noqa: F401
    import train_dopsd_lora  # noqa: F401

    force_engines_on_cpu()
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    for case in json.loads(Path(cases_file).read_text()):
        run_group(case, results, float(timeout))


if __name__ == "__main__":
    main(*sys.argv[1:])
