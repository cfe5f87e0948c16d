"""Bad input, by class: every flag's range and every data row's shape is refused with one `error:` line naming it,
before anything is loaded or written. In-process (parse_args, collect_raw_examples) so that the classes stay cheap."""

import argparse
import json
import pathlib
import re

import pytest
from PIL import Image

import caption_dopsd
import evaluate_dopsd
import train_dopsd_full
import train_dopsd_lora
from conftest import run_script
from dopsd_args import UserError, run_main
from dopsd_data import ConditionCache, Example, _dataset_rows, collect_raw_examples

# -- flags -------------------------------------------------------------------------------------------------------------

SHARED = {
    "--resolution": ["0", "-16", "100", "nan", "1.5", "64px"],
    "--teacher_min_pixels": ["0", "-1"],
    "--teacher_max_pixels": ["0", "1e6"],
    "--num_inference_steps": ["0", "-1"],
    "--rollout_steps": ["0"],
    "--ema_decay": ["-0.1", "1.5", "nan", "inf"],
    "--seed": ["-1", str(2**32), "1.5"],
    "--train_batch_size": ["0", "-1"],
    "--max_train_steps": ["0", "-5", "1e3"],
    "--gradient_accumulation_steps": ["0", "-2"],
    "--learning_rate": ["0", "-1e-4", "nan", "inf", "-inf", "fast"],
    "--lr_scheduler": ["cosine_annealing", "piecewise_constant", ""],
    "--lr_warmup_steps": ["-1", "0.5"],
    "--adam_beta1": ["1", "-0.1", "nan"],
    "--adam_beta2": ["1.0", "2"],
    "--adam_weight_decay": ["-0.01", "nan", "inf"],
    "--adam_epsilon": ["0", "-1e-8", "inf"],
    "--max_grad_norm": ["0", "-1", "nan", "inf"],
    "--checkpointing_steps": ["0", "-1"],
    "--checkpoints_total_limit": ["0", "-1"],
    "--validation_steps": ["-1"],
    "--num_validation_images": ["0", "-1"],
    "--quality_warn_ratio": ["0", "-1", "nan", "inf"],
    "--report_to": ["tensorbord"],
    "--aspect_ratio_buckets": ["", "0,1024", "1024x1024", "1024,1024;-1,5"],
    "--output_dir": ["", "  "],
    "--instance_prompt": ["", "   "],
    "--validation_prompt": ["  "],
    "--caption_column": [",", "text,,short", "text,short,text"],
    "--pretrained_model_name_or_path": [""],
    "--condition_cache_dir": [""],
    "--resume_from_checkpoint": [""],
}
LORA = {"--rank": ["0", "-4", "8.5"], "--lora_alpha": ["0", "-1"], "--lora_dropout": ["1", "-0.1", "nan"],
        "--lora_layers": ["", ","]}
FULL = {"--max_shard_size": ["0", "5XB", "-1GB", "", "0.0000001KB"]}
EVALUATE = {"--num_inference_steps": ["0"], "--height": ["0", "100"], "--width": ["-16"], "--seeds": ["", "-1", "0,x", "0,1,0"],
            "--quality_warn_ratio": ["nan", "0"], "--output_dir": [""]}
CAPTION = {"--batch_size": ["0"], "--min_pixels": ["0"], "--max_pixels": ["-1"], "--max_new_tokens": ["0", "nan"],
           "--max_images": ["0"]}


def cases(table):
    return [(flag, value) for flag, values in table.items() for value in values]


@pytest.fixture(scope="session")
def model_index(tmp_path_factory):
    """A base model as finalize_args sees it: only model_index.json (no weights are read before the checks)."""
    folder = tmp_path_factory.mktemp("zimage-index")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline", "is_distilled": True}))
    return folder


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(folder / "a.png")
    Image.new("RGB", (64, 64), (30, 20, 10)).save(folder / "b.png")
    return folder


def refused(main, argv, capsys, runner=run_main) -> str:
    """The one line a refused command prints: exit status 2, one `error:` line on stderr, nothing else."""
    with pytest.raises(SystemExit) as exit_info:
        runner(lambda: main(argv))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def training_argv(model_index, data, tmp_path, *extra):
    return ["--pretrained_model_name_or_path", str(model_index), "--instance_data_dir", str(data),
            "--output_dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("script, flag, value", [(train_dopsd_lora, f, v) for f, v in cases({**SHARED, **LORA})]
                         + [(train_dopsd_full, f, v) for f, v in cases(FULL)])
def test_training_flag_out_of_range_is_one_line_before_anything_is_written(script, flag, value, model_index, data, tmp_path, capsys):
    line = refused(script.parse_args, training_argv(model_index, data, tmp_path, flag, value), capsys)
    assert flag in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--teacher_min_pixels", "5000", "--teacher_max_pixels", "4096"], "--teacher_min_pixels 5000 is above"),
    (["--lr_scheduler", "linear", "--lr_warmup_steps", "11", "--max_train_steps", "10"], "--lr_warmup_steps 11 is longer"),
    (["--condition_cache_dir", "FILE"], "--condition_cache_dir .* is a file"),
    (["--push_to_hub", "--hub_model_id", "me/my run"], "--hub_model_id 'me/my run' is not a Hub repository name"),
    (["--hub_model_id", "a/b/c"], "--hub_model_id 'a/b/c' is not"),
    (["--push_to_hub", "--output_dir", "OUT/my run"], "the --output_dir name .*'my run' is not"),
])
def test_flags_that_do_not_fit_together(extra, message, model_index, data, tmp_path, capsys):
    (tmp_path / "FILE").write_text("")
    extra = [str(tmp_path / "FILE") if e == "FILE" else e.replace("OUT", str(tmp_path / "out")) for e in extra]
    line = refused(train_dopsd_lora.parse_args, training_argv(model_index, data, tmp_path, *extra), capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_a_tracker_that_is_not_installed_is_refused_not_dropped(tracker, model_index, data, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else find_spec(name, *a))
    line = refused(train_dopsd_lora.parse_args, training_argv(model_index, data, tmp_path, "--report_to", tracker), capsys)
    assert f"--report_to {tracker} needs the {tracker} package" in line
    train_dopsd_lora.parse_args(training_argv(model_index, data, tmp_path, "--report_to", "none"))


def test_good_flags_pass(model_index, data, tmp_path):
    """The same harness accepts the edges of every range (so the refusals above are the values, not the harness)."""
    argv = training_argv(model_index, data, tmp_path, "--resolution", "16", "--seed", str(2**32 - 1), "--ema_decay", "1",
                         "--adam_beta1", "0", "--lora_dropout", "0.5", "--validation_steps", "0", "--lr_warmup_steps", "0",
                         "--learning_rate", "1e-6", "--lr_scheduler", "cosine_with_restarts", "--max_train_steps", "1",
                         "--caption_column", "text, short", "--push_to_hub", "--hub_model_id", "user/dopsd-toy.v1")
    args, _ = train_dopsd_lora.parse_args(argv)
    assert (args.resolution, args.seed, args.lora_dropout, args.learning_rate) == (16, 2**32 - 1, 0.5, 1e-6)
    full, _ = train_dopsd_full.parse_args(training_argv(model_index, data, tmp_path, "--max_shard_size", "123"))
    assert full.max_shard_size == 123
    assert train_dopsd_full.parse_args(training_argv(model_index, data, tmp_path, "--max_shard_size", "0.5GB"))[0].max_shard_size == "0.5GB"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", cases(EVALUATE))
def test_evaluate_flag_out_of_range(flag, value, tmp_path, capsys):
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--eval_file", str(tmp_path / "e.jsonl"),
            "--output_dir", str(tmp_path / "out"), flag, value]
    assert flag in refused(evaluate_dopsd.main, argv, capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", cases(CAPTION) + [("--min_pixels", "5000")])
def test_caption_flag_out_of_range(flag, value, data, capsys):
    extra = ["--max_pixels", "4096"] if flag == "--min_pixels" and value == "5000" else []
    argv = ["--instance_data_dir", str(data), flag, value, *extra]
    assert flag in refused(caption_dopsd.main, argv, capsys, caption_dopsd.run_main)
    assert not (data / "metadata.jsonl").exists()


def test_every_numeric_flag_has_a_range():
    """A flag added with a bare type=int or type=float would take 0, negatives, NaN and infinity unchecked."""
    parsers = [train_dopsd_lora.make_parser(), train_dopsd_full.make_parser(), evaluate_dopsd.make_parser(),
               caption_dopsd.make_parser()]
    for parser in parsers:
        for action in parser._actions:
            assert action.type not in (int, float), f"{parser.prog} {action.option_strings[0]} has no range check"
            if isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
                assert action.type is not None, f"{parser.prog} {action.option_strings[0]} has no type"


def test_end_to_end_a_bad_flag_is_one_line_and_exit_2(data):
    # caption_dopsd.py imports only the standard library before its checks, so this subprocess costs a second; the
    # training scripts take the same path (run_main around main), checked in-process above.
    for argv, line in [(["--batch_size", "0"], "error: argument --batch_size: must be at least 1, got 0 (see caption_dopsd.py --help)"),
                       (["--min_pixels", "nan"], "error: argument --min_pixels: 'nan' is not a whole number (see caption_dopsd.py --help)")]:
        result = run_script("caption_dopsd.py", ["--instance_data_dir", data, *argv], check=False)
        assert result.returncode == 2 and result.stdout == "" and result.stderr.splitlines() == [line]
    assert not (data / "metadata.jsonl").exists()


def test_a_bad_row_stops_the_training_script_before_any_weights_are_looked_for(model_index, data, tmp_path, capsys):
    # model_index.json alone is the base model: the row must be refused before the pipeline is loaded.
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "[V]"}\n{"file_name": "b.png", "text": " \\t "}\n')
    line = refused(train_dopsd_lora.main, training_argv(model_index, data, tmp_path), capsys)
    assert line == f"error: {data / 'metadata.jsonl'}:2: 'text' is empty: write a caption or remove 'text'."
    assert not (tmp_path / "out").exists()


# -- data rows ---------------------------------------------------------------------------------------------------------

GOOD_ROW = {"file_name": "a.png", "text": "[V] toy"}


def rows(*lines):
    """metadata.jsonl text: a good first row, then the lines under test (so the bad one is line 2)."""
    return "\n".join([json.dumps(GOOD_ROW), *lines]) + "\n"


METADATA_CASES = {
    "blank caption": (rows('{"file_name": "b.png", "text": "   "}'), None, r"metadata\.jsonl:2: 'text' is empty"),
    "empty caption": (rows('{"file_name": "b.png", "text": ""}'), None, r"metadata\.jsonl:2: 'text' is empty"),
    "tab-only caption": (rows('{"file_name": "b.png", "caption": "\\t\\n"}'), None, r":2: 'caption' is empty"),
    "number caption": (rows('{"file_name": "b.png", "text": 5}'), None, r":2: 'text' is a int, not text"),
    "list caption": (rows('{"file_name": "b.png", "text": ["a", "b"]}'), None, r":2: 'text' is a list, not text"),
    "NUL in caption": (rows('{"file_name": "b.png", "text": "a\\u0000b"}'), None, r":2: 'text' holds a NUL"),
    "blank listed column": (rows('{"file_name": "b.png", "short": "x", "long": " "}'), "short,long", r":2: 'long' is empty"),
    "column typo": (rows('{"file_name": "b.png", "text": "x"}'), "txt", r"--caption_column txt matches no field"),
    "one column of several": (rows('{"file_name": "b.png", "text": "x"}'), "text,shrot", r"--caption_column shrot matches no field"),
    "empty file": ("", None, r"metadata\.jsonl is empty"),
    "blank lines only": ("\n  \n\r\n", None, r"metadata\.jsonl is empty"),
    "raw NUL byte": (rows('{"file_name": "b.png", "text": "a\x00b"}'), None, r"metadata\.jsonl:2 holds a NUL byte"),
    "list line": (rows('["b.png", "x"]'), None, r":2 is a JSON list, not an object"),
    "string line": (rows('"b.png"'), None, r":2 is a JSON str, not an object"),
    "null line": (rows("null"), None, r":2 is a JSON NoneType, not an object"),
    "invalid JSON": (rows('{"file_name": "b.png",'), None, r":2 is not valid JSON"),
    "no file_name": (rows('{"text": "x"}'), None, r":2 has no 'file_name'"),
    "file_name number": (rows('{"file_name": 5, "text": "x"}'), None, r":2: 'file_name' must be the image's path"),
    "file_name null": (rows('{"file_name": null, "text": "x"}'), None, r":2: 'file_name' must be"),
    "file_name list": (rows('{"file_name": ["b.png"], "text": "x"}'), None, r":2: 'file_name' must be"),
    "file_name empty": (rows('{"file_name": "", "text": "x"}'), None, r":2: 'file_name' must be"),
    "file_name NUL": (rows('{"file_name": "b.png\\u0000", "text": "x"}'), None, r":2: 'file_name' must be"),
    "file_name folder": (rows('{"file_name": "sub", "text": "x"}'), None, r":2: 'file_name' 'sub' is a folder"),
    "file_name dot": (rows('{"file_name": ".", "text": "x"}'), None, r":2: 'file_name' '.' is a folder"),
    "file_name missing": (rows('{"file_name": "c.png", "text": "x"}'), None, r":2: 'file_name' 'c.png' does not exist"),
    "file_name twice": (rows('{"file_name": "./a.png", "text": "x"}'), None, r":2 lists './a.png' again \(first at line 1\)"),
    "file_name outside": (rows('{"file_name": "../a.png", "text": "x"}'), None, r":2: .*outside the dataset folder"),
    "file_name absolute": (rows('{"file_name": "/etc/hostname", "text": "x"}'), None, r":2: .*outside the dataset folder"),
    "file_name link outside": (rows('{"file_name": "out.png", "text": "x"}'), None, r":2: 'file_name' .*out\.png points outside"),
    "file_name link loop": (rows('{"file_name": "loop.png", "text": "x"}'), None, r":2: 'file_name' .*loop\.png is a symlink loop"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_bad_metadata_rows_are_one_line_naming_the_file_and_line(case, data, tmp_path):
    text, columns, message = METADATA_CASES[case]
    (data / "sub").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "elsewhere.png")
    (data / "out.png").symlink_to(tmp_path / "elsewhere.png")
    (data / "loop.png").symlink_to(data / "loop.png")
    (data / "metadata.jsonl").write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=message) as error:
        collect_raw_examples(folder_args(data, caption_column=columns, instance_prompt="[V]"))
    assert "\n" not in str(error.value)


def folder_args(folder, **overrides):
    base = dict(instance_data_dir=str(folder), dataset_name=None, caption_column=None, instance_prompt=None)
    return argparse.Namespace(**{**base, **overrides})


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_metadata_that_is_not_utf8(encoding, data):
    (data / "metadata.jsonl").write_bytes(rows('{"file_name": "b.png", "text": "café"}').encode(encoding))
    with pytest.raises(UserError, match=rf"metadata\.jsonl is not UTF-8 text \(byte \d+\): re-save it as UTF-8"):
        collect_raw_examples(folder_args(data))


def test_metadata_with_a_byte_order_mark_and_unicode_line_separators_is_read(data):
    caption = "a [V] toy\u2028on two lines"  # json.dumps(ensure_ascii=False) writes U+2028 raw
    text = rows(json.dumps({"file_name": "b.png", "text": caption}, ensure_ascii=False))
    (data / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    raw = collect_raw_examples(folder_args(data))
    assert [row.captions for row in raw] == [["[V] toy"], [caption]]


def test_a_null_caption_is_no_caption(data):
    (data / "metadata.jsonl").write_text(rows('{"file_name": "b.png", "text": null, "caption": "[V] on grass"}'))
    assert [row.captions for row in collect_raw_examples(folder_args(data))] == [["[V] toy"], ["[V] on grass"]]


def test_rows_missing_some_listed_columns_use_their_others(data, caplog):
    (data / "metadata.jsonl").write_text(rows('{"file_name": "b.png", "short": "[V]", "long": "a [V] toy"}')
                                         .replace('"text"', '"short"'))
    raw = collect_raw_examples(folder_args(data, caption_column="short,long"))
    assert [row.captions for row in raw] == [["[V] toy"], ["[V]", "a [V] toy"]]
    assert sum("lack some of --caption_column short,long" in r.message for r in caplog.records) == 1


def test_metadata_file_itself_must_be_readable_and_inside(data, tmp_path, monkeypatch):
    (tmp_path / "metadata.jsonl").write_text(rows())
    (data / "metadata.jsonl").symlink_to(tmp_path / "metadata.jsonl")
    with pytest.raises(UserError, match="metadata file .*points outside the dataset folder"):
        collect_raw_examples(folder_args(data))
    (data / "metadata.jsonl").unlink()
    (data / "metadata.jsonl").symlink_to(data / "metadata.jsonl")
    with pytest.raises(UserError, match="metadata file .* is a symlink loop"):
        collect_raw_examples(folder_args(data))
    (data / "metadata.jsonl").unlink()
    (data / "metadata.jsonl").write_text(rows())
    real = pathlib.Path.read_bytes

    def denied(self):
        if self.name == "metadata.jsonl":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)  # root reads any file, so chmod 000 proves nothing here
    with pytest.raises(UserError, match=r"cannot read metadata file .*metadata\.jsonl \(Permission denied\)"):
        collect_raw_examples(folder_args(data))


TXT_CASES = {
    "blank": (lambda d, t: (d / "a.txt").write_text(" \n\t "), r"caption file .*a\.txt is empty"),
    "NUL": (lambda d, t: (d / "a.txt").write_bytes("[V]".encode("utf-16-le")), r"a\.txt holds a NUL"),
    "not UTF-8": (lambda d, t: (d / "a.txt").write_bytes("caf\xe9".encode("latin-1")), r"a\.txt is not UTF-8"),
    "a folder": (lambda d, t: (d / "a.txt").mkdir(), r"a\.txt is a folder"),
    "link outside": (lambda d, t: (t / "secret.txt").write_text("hf_token") and (d / "a.txt").symlink_to(t / "secret.txt"),
                     r"caption file .*a\.txt points outside the dataset folder"),
    "link loop": (lambda d, t: (d / "a.txt").symlink_to(d / "a.txt"), r"caption file .*a\.txt is a symlink loop"),
    "broken link": (lambda d, t: (d / "a.txt").symlink_to(d / "gone.txt"), r"cannot read caption .*gone\.txt"),
    "image link outside": (lambda d, t: Image.new("RGB", (8, 8)).save(t / "x.png") or (d / "c.png").symlink_to(t / "x.png"),
                           r"image .*c\.png points outside the dataset folder"),
    "image link loop": (lambda d, t: (d / "c.png").symlink_to(d / "c.png"), r"image .*c\.png is a symlink loop"),
    "image broken link": (lambda d, t: (d / "c.png").symlink_to(d / "gone.png"), r"image .*c\.png is a link to a missing file"),
}


@pytest.mark.parametrize("case", list(TXT_CASES))
def test_bad_caption_files_and_images_of_a_folder(case, data, tmp_path):
    make, message = TXT_CASES[case]
    make(data, tmp_path)
    with pytest.raises(UserError, match=message) as error:
        collect_raw_examples(folder_args(data, instance_prompt="[V]"))
    assert "\n" not in str(error.value)


def test_caption_files_with_a_byte_order_mark_and_hidden_files(data):
    (data / "a.txt").write_bytes(b"\xef\xbb\xbf[V] toy\n")
    (data / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # what macOS leaves beside a copied photo
    raw = collect_raw_examples(folder_args(data, instance_prompt="[V]"))
    assert [(pathlib.Path(row.name).name, row.captions) for row in raw] == [("a.png", ["[V] toy"]), ("b.png", ["[V]"])]


@pytest.mark.parametrize("value, message", [("  ", "'text' is empty"), (3, "'text' is a int"), ("a\0b", "'text' holds a NUL")])
def test_dataset_rows_follow_the_same_caption_rule(value, message):
    args = argparse.Namespace(dataset_name="user/set", instance_prompt="[V]", image_column="image")
    good = {"image": None, "text": "[V] toy"}
    rows_read = _dataset_rows(args, [good, {"image": None, "text": value}], ["text"])
    assert next(rows_read)[2] == ["[V] toy"]
    with pytest.raises(UserError, match=rf"row 1 of user/set: {message}"):
        next(rows_read)
    # A null caption is no caption: --instance_prompt.
    assert next(_dataset_rows(args, [{"image": None, "text": None}], ["text"]))[2] == ["[V]"]


# -- captions longer than the text encoder reads -----------------------------------------------------------------------


def templated_tokens(family, prompt):
    tokenizer = family.pipe.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                                         **family.chat_template_kwargs)
    return len(tokenizer(text)["input_ids"])


@pytest.mark.parametrize("family_name", ["zimage", "klein"])
def test_long_captions_are_cut_where_the_stock_pipeline_cuts_with_one_warning(family_name, request, caplog):
    from pipeline_dopsd import family_for

    family = family_for(request.getfixturevalue(family_name))
    long = "a photo of [V] toy, " + " ".join(f"word{i}" for i in range(1500))
    cut = family.fit_caption(long)
    assert long.startswith(cut) and len(cut) < len(long)
    # The student's prompt and, for klein, the teacher's with its suffix are read whole ...
    prompts = (lambda caption: [caption, family.teacher_prompt(caption)]) if family_name == "klein" else (lambda caption: [caption])
    assert all(templated_tokens(family, p) <= family.max_sequence_length for p in prompts(cut))
    # ... and it is the longest such start: one more word would not fit.
    longer = long[: long.index(" ", len(cut) + 1)]
    assert any(templated_tokens(family, p) > family.max_sequence_length for p in prompts(longer))
    assert family.fit_caption("a photo of [V] toy") == "a photo of [V] toy"
    examples = [Example("toy_rug.png", None, [long, "short"]), Example("toy_grass.png", None, [long])]
    fitted = ConditionCache.fit_captions(family, examples, "dopsd")
    assert fitted == {long: cut, "short": "short"}
    warnings = [r.message for r in caplog.records if "longer than the 512 tokens" in r.message]
    assert len(warnings) == 1 and warnings[0].startswith("toy_rug.png:")


class RecordingFamily:
    """Encoders that record what they are given; captions are 'fitted' to their first 5 characters."""

    max_sequence_length, display_name = 512, "Z-Image-Turbo"

    def __init__(self):
        self.encoded = []

    def fit_caption(self, caption, teacher=True):
        return caption[:5]

    def encoders_for(self, kind):
        return []

    def encode_student(self, prompts, sources=None):
        import torch

        self.encoded += [("student", p) for p in prompts]
        return [{"caption": torch.zeros(1)}]

    def encode_teacher(self, prompts, images, sources=None):
        import torch

        self.encoded += [("teacher", p) for p in prompts]
        return [{"caption": torch.zeros(1)}]


def test_the_fitted_caption_is_encoded_under_the_caption_s_own_key():
    family, cache = RecordingFamily(), ConditionCache()
    example = Example("a.png", Image.new("RGB", (16, 16)), ["a photo of [V] toy"])
    cache.fill(family, [example], "dopsd")
    assert sorted(family.encoded) == [("student", "a pho"), ("teacher", "a pho")]
    assert cache.student("a photo of [V] toy", example) is not None and cache.teacher(0, "a photo of [V] toy") is not None


def test_a_teacher_context_over_the_limit_names_the_image():
    class Family(RecordingFamily):
        def fit_caption(self, caption, teacher=True):
            return caption

        def encode_teacher(self, prompts, images, sources=None):
            raise ValueError("The teacher context is 2000 tokens, over the limit of 1504: lower --teacher_max_pixels.")

    example = Example("big.png", Image.new("RGB", (16, 16)), ["[V]"])
    with pytest.raises(UserError, match=r"^big\.png: The teacher context is 2000 tokens.*--teacher_max_pixels"):
        ConditionCache().fill(Family(), [example], "dopsd")


# -- the other scripts' files follow the same rules ----------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ('[1]\n', r"metadata\.jsonl:1 is a JSON list, not an object"),
    ('{"file_name": 5}\n', r"metadata\.jsonl:1: 'file_name' must be"),
    ('{"file_name": "loop.png"}\n', r"metadata\.jsonl:1: 'loop.png' is a symlink loop"),
])
def test_caption_script_reads_metadata_like_the_trainer(text, message, data):
    (data / "loop.png").symlink_to(data / "loop.png")
    (data / "metadata.jsonl").write_text(text)
    with pytest.raises(caption_dopsd.UserError, match=message):
        caption_dopsd.Metadata(data)


def test_caption_script_accepts_a_byte_order_mark_and_refuses_captions_linked_from_outside(data, tmp_path):
    (data / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_ROW).encode() + b"\n")
    assert caption_dopsd.Metadata(data).rows == {0: GOOD_ROW}
    (data / "b.txt").write_bytes(b"\xef\xbb\xbfa [V] toy")
    assert caption_dopsd.read_txt_caption(data / "b.png", data) == "a [V] toy"
    (tmp_path / "secret.txt").write_text("not for the model card")
    (data / "a.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(caption_dopsd.UserError, match=r"caption file .*a\.txt points outside the dataset folder"):
        caption_dopsd.read_txt_caption(data / "a.png", data)


@pytest.mark.parametrize("contents, message", [
    ("caf\xe9".encode("latin-1"), r"is not UTF-8 text \(byte 3\)"),
    (b'{"prompt": "a\x00"}\n', r"line 1 holds a NUL byte"),
])
def test_eval_file_that_is_not_utf8_text(contents, message, tmp_path):
    (tmp_path / "e.jsonl").write_bytes(contents)
    with pytest.raises(UserError, match=message):
        evaluate_dopsd.read_eval_file(str(tmp_path / "e.jsonl"))
    (tmp_path / "e.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a [V] dog"}\n')
    assert [p.prompt for p in evaluate_dopsd.read_eval_file(str(tmp_path / "e.jsonl"))] == ["a [V] dog"]
