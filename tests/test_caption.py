"""caption_dopsd.py: metadata.jsonl in the reference's caption fields, read by the trainer; resumable, never tearing a
line, keeping the user's captions, bad input named before the model loads. The tiny Qwen3-VL writes noise: what is
checked is the file, not the words."""

import argparse
import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import caption_dopsd
from caption_dopsd import GRANULARITIES, Trigger, UserError, clean_caption, cut_to_last_sentence
from conftest import REPO, run_script

SIX = caption_dopsd.DEFAULT_FIELDS.split(",")


@pytest.fixture
def vlm(tiny_models):
    return str(tiny_models / "qwen3-vl-teacher")


@pytest.fixture
def folder(tmp_path, sample_data):
    """The four tiny training images with their .txt captions, in a folder of their own."""
    target = tmp_path / "concept"
    shutil.copytree(sample_data, target)
    return target


def caption(folder, vlm, *extra):
    """Run the command in this process (the tiny model loads in a fraction of a second)."""
    return caption_dopsd.main(["--instance_data_dir", str(folder), "--vlm_name_or_path", vlm, "--max_new_tokens", "3",
                               "--min_pixels", "1024", "--max_pixels", "4096", *map(str, extra)])


def rows_of(folder):
    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def trainer_rows(folder, caption_column=None):
    from dopsd_data import collect_raw_examples

    args = argparse.Namespace(instance_data_dir=str(folder), caption_column=caption_column, instance_prompt=None)
    return collect_raw_examples(args)


def field_of(request):
    for granularity, texts in GRANULARITIES.items():
        for language in ("en", "zh"):
            if request.startswith(texts[language]):
                return f"{granularity}_{language}"
    raise AssertionError(request)


def fake_vlm(monkeypatch, answer=lambda field, n: f"{field} caption {n}", calls=None):
    """Replace the generation by answer(field, call number), recording each call's field and batch size."""
    calls = [] if calls is None else calls

    def generate(self, images, request, max_new_tokens):
        calls.append((field_of(request), len(images)))
        return [(answer(field_of(request), len(calls)), True) for _ in images]

    monkeypatch.setattr(caption_dopsd.Captioner, "generate", generate)
    return calls


# -- the file and the trainer ------------------------------------------------------------------------------------------


def test_cli_writes_one_row_per_image_that_the_trainer_reads(folder, vlm):
    txt_before = {p.name: p.read_bytes() for p in folder.glob("*.txt")}
    result = run_script("caption_dopsd.py", ["--instance_data_dir", folder, "--vlm_name_or_path", vlm,
                                             "--instance_token", "[V]", "--class_noun", "toy", "--batch_size", 3,
                                             "--max_new_tokens", 3, "--min_pixels", 1024, "--max_pixels", 4096])
    assert "captioning" in result.stderr and "--caption_column " + ",".join(SIX) in result.stdout
    rows = rows_of(folder)
    images = sorted(p.name for p in folder.glob("*.png"))
    assert sorted(r["file_name"] for r in rows) == images  # one row each, relative to the folder
    for row in rows:
        for name in SIX:
            assert isinstance(row[name], str) and row[name].strip() and "[V]" in row[name], (name, row)
        assert row["class_name"] == "toy"
        assert row["text"] == txt_before[row["file_name"].replace(".png", ".txt")].decode().strip()
    assert {p.name: p.read_bytes() for p in folder.glob("*.txt")} == txt_before  # .txt files never touched
    assert not list(folder.glob(".metadata.jsonl*"))  # no temporary or lock file left behind

    read = trainer_rows(folder, ",".join(SIX))
    assert len(read) == 4 and all(len(row.captions) == 6 for row in read)
    assert sorted(row.captions[0] for row in trainer_rows(folder)) == sorted(r["text"] for r in rows)

    before = (folder / "metadata.jsonl").stat()
    caption(folder, vlm, "--instance_token", "[V]", "--class_noun", "toy")
    after = (folder / "metadata.jsonl").stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)  # a finished folder: nothing written


def test_rows_without_a_txt_caption_get_text_from_the_first_field(tmp_path, vlm, monkeypatch):
    Image.new("RGB", (64, 64), (10, 90, 30)).save(tmp_path / "a.png")
    fake_vlm(monkeypatch)
    caption(tmp_path, vlm, "--caption_fields", "detailed_en,short_zh")
    [row] = rows_of(tmp_path)
    assert set(row) == {"file_name", "detailed_en", "short_zh", "text"}  # no trigger asked, no class noun given
    assert row["text"] == row["detailed_en"] == "detailed_en caption 1"


# -- resuming -----------------------------------------------------------------------------------------------------------


def test_an_interrupted_run_keeps_its_finished_batches_and_the_next_run_does_the_rest(folder, vlm, monkeypatch):
    def interrupt_second_batch(field, n):
        if n > len(SIX):
            raise KeyboardInterrupt
        return "a toy on a rug"

    calls = fake_vlm(monkeypatch, interrupt_second_batch)
    with pytest.raises(SystemExit) as stopped:
        caption(folder, vlm, "--batch_size", 1, "--instance_token", "[V]", "--class_noun", "toy")
    assert stopped.value.code == 130
    [first] = rows_of(folder)
    assert all(first[name] == "a [V] toy on a rug" for name in SIX[:3])
    first_line = (folder / "metadata.jsonl").read_text().splitlines()[0]

    calls.clear()
    fake_vlm(monkeypatch, calls=calls)
    caption(folder, vlm, "--batch_size", 1, "--instance_token", "[V]", "--class_noun", "toy")
    assert len(calls) == 3 * len(SIX)  # only the three images left
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    assert lines[0] == first_line and len(lines) == 4
    assert len({json.loads(line)["file_name"] for line in lines}) == 4


def test_a_save_killed_halfway_leaves_the_previous_file_whole(folder, vlm, monkeypatch):
    fake_vlm(monkeypatch)
    real_replace, saves = caption_dopsd.os.replace, []

    def replace_killed_on_second_save(source, target):
        saves.append(source)
        if len(saves) == 2:  # die while saving the second batch: a half-written temporary, no rename
            with open(source, "rb") as handle:
                data = handle.read()
            with open(source, "wb") as handle:
                handle.write(data[: len(data) // 2])
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(caption_dopsd.os, "replace", replace_killed_on_second_save)
    with pytest.raises(SystemExit):
        caption(folder, vlm, "--batch_size", 2)
    assert len(rows_of(folder)) == 2  # the first batch, whole
    assert len(trainer_rows(folder, ",".join(SIX))) == 2
    [stale] = folder.glob(".metadata.jsonl.*.tmp")  # what a killed save leaves
    stale.rename(folder / ".metadata.jsonl.4242.tmp")  # as from another process, since this test runs in one

    monkeypatch.setattr(caption_dopsd.os, "replace", real_replace)
    caption(folder, vlm, "--batch_size", 2)
    assert len(rows_of(folder)) == 4 and not list(folder.glob(".metadata.jsonl.*.tmp"))


def test_max_images_captions_part_of_the_folder_and_the_next_run_the_rest(folder, vlm, monkeypatch):
    calls = fake_vlm(monkeypatch)
    caption(folder, vlm, "--max_images", 1, "--caption_fields", "short_en")
    assert len(rows_of(folder)) == 1 and len(calls) == 1
    caption(folder, vlm, "--caption_fields", "short_en")
    assert len(rows_of(folder)) == 4 and calls[1:] == [("short_en", 3)]  # one batch of the three left


def test_a_second_run_on_the_same_folder_is_refused_while_one_runs(folder, vlm):
    with caption_dopsd.FolderLock(folder), pytest.raises(UserError, match="another caption_dopsd.py is writing"):
        caption(folder, vlm)


# -- consent ------------------------------------------------------------------------------------------------------------


def test_existing_captions_are_kept_and_only_replaced_with_overwrite(tmp_path, vlm, monkeypatch):
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / f"{name}.png")
    (tmp_path / "c.txt").write_text("c, written by hand\n")
    mine_a = '{"short_en": "mine, by hand",  "file_name": "a.png", "text": "my own caption"}'
    mine_b = '{"file_name": "b.png", "short_en": "b short", "medium_en": "b medium"}'
    (tmp_path / "metadata.jsonl").write_text(mine_a + "\n" + mine_b)  # no final newline: must not glue the next row
    original = (tmp_path / "metadata.jsonl").read_bytes()
    fake_vlm(monkeypatch)
    caption(tmp_path, vlm, "--caption_fields", "short_en,medium_en")

    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    a, b, c = (json.loads(line) for line in lines)
    assert a["short_en"] == "mine, by hand" and a["text"] == "my own caption" and a["medium_en"].startswith("medium_en")
    assert lines[1] == mine_b  # a complete row is left exactly as it was
    assert c["file_name"] == "c.png" and c["text"] == "c, written by hand" and c["short_en"].startswith("short_en")
    assert (tmp_path / "c.txt").read_text() == "c, written by hand\n"

    before_overwrite = (tmp_path / "metadata.jsonl").read_bytes()
    fake_vlm(monkeypatch, lambda field, n: f"new {field} {n}")
    caption(tmp_path, vlm, "--caption_fields", "short_en,medium_en", "--overwrite_captions")
    a, b, c = rows_of(tmp_path)
    assert a["short_en"].startswith("new short_en") and b["medium_en"].startswith("new medium_en")
    assert a["text"] == "my own caption" and c["text"] == "c, written by hand"  # not a requested field
    assert (tmp_path / "metadata.jsonl.bak").read_bytes() == before_overwrite
    assert before_overwrite != original and not (tmp_path / "metadata.jsonl.bak2").exists()


def test_text_that_copies_the_first_field_follows_it_on_overwrite(tmp_path, vlm, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    fake_vlm(monkeypatch, lambda field, n: "old")
    caption(tmp_path, vlm, "--caption_fields", "short_en")
    fake_vlm(monkeypatch, lambda field, n: "new")
    caption(tmp_path, vlm, "--caption_fields", "short_en", "--overwrite_captions")
    assert rows_of(tmp_path) == [{"file_name": "a.png", "short_en": "new", "text": "new"}]


# -- what the VLM writes: trigger, clean-up, never empty ------------------------------------------------------------------


def test_trigger_placement_is_deterministic():
    toy = Trigger("[V]", "toy")
    assert toy.place("A brown toy on the grass.", "en") == "A brown [V] toy on the grass."
    assert toy.place("Two Toys on a rug", "en") == "Two [V] Toys on a rug"
    assert toy.place("a toyota parked outside", "en") == "[V] toy, a toyota parked outside"  # not a mention
    assert toy.place("here is [V] toy again", "en") == "here is [V] toy again"  # never twice
    assert toy.place("草地上的玩具", "zh") == "[V] toy，草地上的玩具"  # no Chinese noun given: a prefix
    zh = Trigger("[V]", "toy", "玩具")
    assert zh.place("草地上的玩具", "zh") == "草地上的[V]玩具" and zh.place("一只小熊", "zh") == "[V]玩具，一只小熊"
    assert Trigger("[V]", "toy", placement="prefix").place("a toy", "en") == "[V] toy, a toy"
    assert Trigger("[V]", "toy", placement="suffix").place("a toy on grass.", "en") == "a toy on grass, [V] toy"
    style = Trigger("[V]", mode="style")
    assert style.place("a cat on a roof", "en") == "[V] style, a cat on a roof"
    assert style.place("屋顶上的猫", "zh") == "[V]风格，屋顶上的猫"
    assert Trigger(None, "toy").place("a toy", "en") == "a toy"


def test_vlm_output_is_cleaned_to_one_safe_line():
    assert clean_caption('<think>hmm</think>\n Caption: "A toy\u2028on\x85the\x1egrass\x00"  ') == "A toy on the grass"
    assert clean_caption("“草地上的玩具”") == "草地上的玩具"
    assert cut_to_last_sentence("A toy sits on grass. Behind it a fen") == "A toy sits on grass."
    assert cut_to_last_sentence("A toy. Then a very long unfinished sentence") == "A toy. Then a very long unfinished sentence"


def test_no_caption_is_empty_or_breaks_the_trainers_line_reader(folder, vlm, monkeypatch):
    answers = {"medium_en": 'Description: "a toy\u2028on\u2029grass\x85"', "short_zh": "</think>"}
    fake_vlm(monkeypatch, lambda field, n: answers.get(field, ""))
    caption(folder, vlm, "--instance_token", "[V]", "--class_noun", "toy", "--caption_fields", ",".join(SIX))
    rows = rows_of(folder)
    assert len(rows) == 4 and len(trainer_rows(folder, ",".join(SIX))) == 4
    for row in rows:
        assert row["medium_en"] == "a [V] toy on grass"
        assert row["short_en"] == row["detailed_en"] == row["medium_en"]  # empty: the nearest granularity stands in
        assert row["short_zh"] == row["medium_zh"] == row["detailed_zh"] == "[V] toy，一张照片"  # none in Chinese


# -- bad input ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(caption_dopsd.Captioner, "from_pretrained", refuse)


@pytest.mark.parametrize("case, message", [
    ("missing folder", "does not exist"),
    ("no images", "holds no images"),
    ("unreadable image", r"cannot read image .*broken\.png"),
    ("unknown model", "cannot read the config of --vlm_name_or_path"),
    ("not a Qwen3-VL", "is a qwen3 model, not Qwen3-VL"),
    ("unknown field", "unknown field long_en"),
    ("broken metadata", r"metadata\.jsonl:2 is not valid JSON"),
    ("row outside the folder", "points outside the dataset folder"),
    ("placement without trigger", "--trigger_placement prefix places --instance_token"),
])
def test_bad_input_is_named_before_the_model_loads(tmp_path, folder, vlm, tiny_models, no_model_load, case, message):
    argv = {"unknown model": ["--vlm_name_or_path", str(tmp_path / "no-such-model")],
            "not a Qwen3-VL": ["--vlm_name_or_path", str(tiny_models / "z-image" / "text_encoder")],
            "unknown field": ["--caption_fields", "short_en,long_en"], "placement without trigger": ["--trigger_placement", "prefix"]}.get(case, [])
    target = folder
    if case == "missing folder":
        target = tmp_path / "nowhere"
    elif case == "no images":
        target = tmp_path / "empty"
        target.mkdir()
        (target / "notes.txt").write_text("not an image")
    elif case == "unreadable image":
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "broken metadata":
        (folder / "metadata.jsonl").write_text('{"file_name": "toy_rug.png", "text": "ok"}\n{"file_name": \n')
    elif case == "row outside the folder":
        (folder / "metadata.jsonl").write_text('{"file_name": "../elsewhere.png", "text": "x"}\n')
    with pytest.raises(UserError, match=message):
        caption_dopsd.main(["--instance_data_dir", str(target), "--vlm_name_or_path", vlm, *argv])
    assert not (folder / "metadata.jsonl").exists() or case in ("broken metadata", "row outside the folder")


def test_skip_bad_images_captions_the_rest(folder, vlm, monkeypatch):
    (folder / "broken.png").write_bytes(b"not an image")
    fake_vlm(monkeypatch)
    caption(folder, vlm, "--skip_bad_images", "--caption_fields", "short_en")
    assert sorted(r["file_name"] for r in rows_of(folder)) == sorted(p.name for p in folder.glob("toy_*.png"))


def test_the_command_line_reports_bad_input_on_one_line_with_status_2(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "caption_dopsd.py"), "--instance_data_dir", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: --instance_data_dir {tmp_path / 'x'} does not exist or is not a folder."]


def test_a_folder_whose_images_are_all_in_sub_folders_says_so_in_both_tools(tmp_path):
    """The captioner and the trainer read the same images of a folder: its top level, never its sub-folders."""
    import dopsd_data

    (tmp_path / "shoot" / "day1").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "shoot" / "day1" / "a.png")
    (tmp_path / "shoot" / "notes.txt").write_text("not an image")
    messages = []
    for read, error_class in ((lambda folder: caption_dopsd.main(["--instance_data_dir", str(folder)]), caption_dopsd.UserError),
                              (trainer_rows, dopsd_data.UserError)):
        with pytest.raises(error_class, match="sub-folders are not read") as error:
            read(tmp_path / "shoot")
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "day1/a.png" in messages[0] and "metadata.jsonl" in messages[0]
    assert not list((tmp_path / "shoot").glob("metadata.jsonl*"))


# -- batching -------------------------------------------------------------------------------------------------------------


def test_a_batch_generates_what_each_image_generates_alone(vlm):
    """Images of different sizes give prompts of different lengths: the batch is padded on the left, so that every
    row's generation continues its own prompt."""
    import torch

    args = argparse.Namespace(vlm_name_or_path=vlm, revision=None, cache_dir=None, min_pixels=1024, max_pixels=16384,
                              device="cpu")
    captioner = caption_dopsd.Captioner.from_pretrained(args, torch.float32)
    images = [Image.new("RGB", (64, 64), (200, 40, 40)), Image.effect_noise((128, 64), 60).convert("RGB"),
              Image.new("RGB", (32, 96), (0, 90, 200))]
    request = caption_dopsd.instruction("short_en", Trigger(), None)
    together = captioner.generate(images, request, 6)
    assert together == [captioner.generate([image], request, 6)[0] for image in images]


def test_the_captioner_splits_metadata_lines_where_the_trainer_does(folder):
    """A caption holding U+2028 (json.dumps(ensure_ascii=False) writes it raw) is one line for both readers."""
    row = {"file_name": "toy_grass.png", "text": "a [V] toy\u2028on grass"}
    (folder / "metadata.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\r\n", encoding="utf-8")
    metadata = caption_dopsd.Metadata(folder)
    assert list(metadata.rows.values()) == [row] and len(metadata.lines) == 1
    assert [r.captions for r in trainer_rows(folder)] == [[row["text"]]]
