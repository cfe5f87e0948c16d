"""benchmarks/bench_train_step.py keeps working: one measurement of each kind, in-process and without timing claims."""

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train_step as bench  # noqa: E402


@pytest.fixture
def tiny_bench(tiny_models, monkeypatch):
    monkeypatch.setattr(bench, "TINY_MODELS", tiny_models)
    return bench


def test_one_iteration_of_each_method_is_measured_and_tabulated(tiny_bench, tmp_path):
    common = dict(model="tiny klein", resolution=64, gradient_checkpointing=False, repeats=1, threads=2)
    rows = [tiny_bench.measure(tiny_bench.Config(method="sft", rollout_steps=1, **common)),
            tiny_bench.measure(tiny_bench.Config(method="dopsd", rollout_steps=1, **common)),
            tiny_bench.measure(tiny_bench.Config(method="dopsd", rollout_steps=2, **common)),
            tiny_bench.measure(tiny_bench.Config(method="dopsd", rollout_steps=2, backward="once", **common))]
    sft, one, two, once = rows
    assert sft["floor_s"] is None and sft["teacher_f_s"] is None  # SFT has no teacher
    for row in (one, two):
        assert row["floor_s"] > 0 and row["time_per_floor"] > 0 and row["teacher_switched_f_s"] > 0
    assert 0 < one["trainable_params"] == two["trainable_params"] < one["transformer_params"]
    # The exact memory accounting sees what one backward over all states keeps (both states' graphs).
    assert 0 < two["above_start_mb"] < two["peak_mb"] and once["above_start_mb"] > 1.5 * two["above_start_mb"]

    verdicts = tiny_bench.summarise(rows, [1, 2], [])
    assert any(line.startswith("- memory 2 vs 1 rollout steps, tiny klein") for line in verdicts)
    assert any(line.startswith("- time / floor, tiny klein") for line in verdicts)
    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n\nkept\n")
    tiny_bench.write_block(output, "tiny", "\n".join(tiny_bench.table(rows)))
    text = output.read_text()
    assert "kept" in text and text.count("| tiny klein |") == 4 and "<!-- bench:tiny:end -->" in text


def test_only_the_transformer_is_left_after_caching(tiny_bench):
    row = tiny_bench.measure_resident("zimage", threads=2)
    assert row["resident_params"] == row["transformer_params"] > 0


def test_real_architectures_get_the_documented_adapters():
    """The LoRA sizes in the README's memory arithmetic: two rank-64 adapters on each family's default layers."""
    rows = {r["model"]: r for r in bench.measure_host_overhead(threads=2)}
    expected = {"Z-Image-Turbo 6B": (238, 158_760_960), "FLUX.2-klein 4B": (100, 96_337_920), "FLUX.2-klein 9B": (144, 174_063_616)}
    assert {name: (r["lora_layers"], r["lora_params"]) for name, r in rows.items()} == expected


def test_real_sizes_get_conditions_of_the_real_shapes():
    """`--size real` runs only on a GPU; its synthetic conditions are checked here, on the meta-device transformers."""
    import torch

    shapes = {}
    for spec in (s for s in bench.SPECS if s.size == "real"):
        family = bench.build_family(spec, torch.bfloat16, on=torch.device("meta"))
        student, teacher, x0 = bench.make_conditions(family, spec, 1024, torch.bfloat16)
        key = "caption" if spec.family == "zimage" else "prompt_embeds"
        shapes[spec.name] = (tuple(x0.shape), tuple(student[key][0].shape if spec.family == "zimage" else student[key].shape),
                             tuple(teacher[key][0].shape if spec.family == "zimage" else teacher["reference_latents"].shape))
    assert shapes == {
        "Z-Image-Turbo 6B": ((1, 16, 128, 128), (128, 2560), (128 + 576, 2560)),  # 1024 px teacher view capped at 768^2 px
        "FLUX.2-klein 4B": ((1, 128, 64, 64), (1, 512, 3 * 2560), (1, 4096, 128)),
        "FLUX.2-klein 9B": ((1, 128, 64, 64), (1, 512, 3 * 4096), (1, 4096, 128)),
    }
