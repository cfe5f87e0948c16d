"""Test-only: run the training scripts under accelerate's own FSDP2 and DeepSpeed engines on a CPU, with gloo.

accelerate 1.15 builds these engines only for GPU-type setups: with `cpu=True` it keeps MULTI_CPU for an FSDP config
(`accelerate/state.py` promotes to FSDP only from MULTI_GPU-like types) and never selects DeepSpeed (`... and not cpu`).
`force_engines_on_cpu` does on a CPU what accelerate does on GPUs, and nothing more: for FSDP it sets the distributed
type and plugin after the state is built; for DeepSpeed it builds the state with `cpu=False` and a gloo process group
(DeepSpeed's CPU accelerator, `DS_ACCELERATOR=cpu`). The engines' own code then runs unchanged. Remove this module
once accelerate accepts MULTI_CPU for these engines.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/cpu_engines.py CASES.json RESULTS_DIR

runs each case of CASES.json (a list of {"name", "script", "config", "argv"}) in turn in the same two processes, with
the environment `accelerate launch --config_file CONFIG` would give the script (computed by accelerate's own launch
code), and writes RESULTS_DIR/<name>.rank<k>.json: whether it ended normally, its error, the engine that really ran
and the parameter bytes each rank held.
"""

from __future__ import annotations

import json
import os
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


def reset_accelerate():
    """Forget the previous case's accelerator (the process group stays), as a fresh process would start."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:
        pass


def run_case(case: dict, results: Path, rank: int):
    import importlib

    import torch.distributed as dist

    for key in [k for k in os.environ if k.startswith(ENGINE_VARIABLES)]:
        del os.environ[key]
    os.environ.update(launch_environment(str(REPO / case["config"])))
    os.environ.update(case.get("env", {}))
    reset_accelerate()
    script = importlib.import_module(case["script"])
    record = {"name": case["name"], "ok": True, "error": None}
    started = time.perf_counter()
    try:
        script.main([str(a) for a in case["argv"]])
    except SystemExit as error:  # an argparse error
        record.update(ok=False, error=f"SystemExit {error.code}")
    except Exception as error:  # noqa: BLE001 -- the test reads what went wrong
        record.update(ok=False, error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-4000:])
    record["seconds"] = round(time.perf_counter() - started, 2)
    from dopsd_engines import last_report

    record["engine"] = last_report()
    (results / f"{case['name']}.rank{rank}.json").write_text(json.dumps(record, indent=1))
    if dist.is_initialized():
        dist.barrier()  # a failed case on one rank must not leave the other waiting in the next one


def main(cases_file: str, results_dir: str):
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    force_engines_on_cpu()
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    for case in json.loads(Path(cases_file).read_text()):
        run_case(case, results, rank)


if __name__ == "__main__":
    main(*sys.argv[1:])
