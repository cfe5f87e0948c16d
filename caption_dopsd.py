#!/usr/bin/env python
# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""Caption a folder of images for training: metadata.jsonl with short to detailed captions in English and Chinese.

    python caption_dopsd.py --instance_data_dir ./my_concept --instance_token "[V]" --class_noun dog
    accelerate launch train_dopsd_lora.py ... --instance_data_dir ./my_concept \\
        --caption_column short_en,medium_en,detailed_en,short_zh,medium_zh,detailed_zh

A Qwen3-VL-Instruct model (default Qwen/Qwen3-VL-4B-Instruct, the VLM of Z-Image's teacher) writes one caption per
field, in the field names of the D-OPSD reference data (short_en, medium_en, detailed_en, short_zh, ...). The trigger
(--instance_token, with --class_noun) is placed by this script, not by the VLM, so every caption carries it.

The folder's metadata.jsonl is the output and the progress record at once: it is rewritten atomically (a temporary
file renamed over it) after every batch, so an interrupted run loses at most the batch in flight, never leaves a torn
line, and the same command continues where it stopped. Captions already there (in metadata.jsonl, or in .txt files)
are never changed unless --overwrite_captions is given; .txt files are never touched.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import shutil
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import dopsd_flags as flags
from dopsd_folders import is_image_name, no_images_message

# Only the standard library at import time: bad input is reported at once, before torch, transformers and the
# trainer's data module (which imports diffusers) are loaded.

logger = logging.getLogger("dopsd.caption")

METADATA = "metadata.jsonl"
# Keys the trainer takes as the caption when no --caption_column is given (the first one present).
DEFAULT_CAPTION_KEYS = ("text", "caption", "prompt")
SUPPORTED_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
DEFAULT_VLM = "Qwen/Qwen3-VL-4B-Instruct"

# What each granularity asks for, in each language, and its token budget (Chinese needs about a token per character).
GRANULARITIES = {
    "short": {
        "en": "Write a short caption for this image in English: a single phrase of at most 12 words that names the main "
              "subject and where it is.",
        "zh": "用中文为这张图片写一个简短的标题：一个不超过二十个字的短语，说出画面的主体和它所在的地方。",
        "max_new_tokens": 48,
    },
    "medium": {
        "en": "Describe this image in English in one or two sentences, about 40 words: the main subject, what it is doing, "
              "the setting and the overall look of the picture.",
        "zh": "用中文以一到两句话（大约六十个字）描述这张图片：主体、它在做什么、所处的环境以及画面的整体感觉。",
        "max_new_tokens": 128,
    },
    "detailed": {
        "en": "Describe this image in English in one detailed paragraph of about 120 words, written as a prompt for an "
              "image generator: the main subject and its appearance, pose and expression, clothing or materials, the "
              "surroundings and background, the lighting, the colours, the composition and the camera angle.",
        "zh": "用中文写一段大约两百字的详细描述，作为图像生成模型的提示词：主体及其外观、姿态和表情、服装或材质、"
              "周围环境和背景、光线、色彩、构图和拍摄角度。",
        "max_new_tokens": 384,
    },
    "user_prompt": {
        "en": "Write the prompt a person would type into an image generator to get this picture: one casual English "
              "sentence of at most 20 words.",
        "zh": "写出一个人为了得到这张图片会在图像生成器里输入的提示词：一句不超过三十个字的口语化中文。",
        "max_new_tokens": 64,
    },
}
LANGUAGES = ("en", "zh")
FIELDS = tuple(f"{g}_{lang}" for lang in LANGUAGES for g in GRANULARITIES)
DEFAULT_FIELDS = "short_en,medium_en,detailed_en,short_zh,medium_zh,detailed_zh"
ANSWER_RULES = {
    "en": "Reply with the caption only: no introduction, no quotation marks, no list, no line breaks.",
    "zh": "只回复描述本身：不要开场白，不要引号，不要列表，不要换行。",
}
STYLE_RULES = {
    "en": "Describe only what is depicted: do not name or describe the art style, the medium, the technique or the artist.",
    "zh": "只描述画面里的内容：不要提及或描述艺术风格、媒介、技法或作者。",
}
SEPARATOR = {"en": ", ", "zh": "，"}
SENTENCE_END = re.compile(r"[.!?。！？]")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one (None means "chosen at run time", and the help says how)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


class UserError(Exception):
    """A problem with the user's input: printed as one `error:` line, exit status 2 (as the training scripts do)."""


def make_parser() -> argparse.ArgumentParser:
    p = flags.Parser(description=__doc__.splitlines()[0], formatter_class=_HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--instance_data_dir", required=True, type=flags.text,
                      help="Folder of images to caption; the captions go to its metadata.jsonl, which the training "
                           "scripts read with the same --instance_data_dir.")
    data.add_argument("--caption_fields", default=DEFAULT_FIELDS,
                      help="Comma-separated caption fields to write, from: " + ", ".join(FIELDS) + ". Pass the same "
                           "list to the trainer's --caption_column.")
    data.add_argument("--overwrite_captions", action="store_true",
                      help="Caption every image again, replacing the values of --caption_fields already in metadata.jsonl "
                           "(a copy of the old file is kept as metadata.jsonl.bak). Without it, existing captions are never "
                           "changed and only missing ones are written.")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="Skip unreadable images with a warning instead of stopping.")
    data.add_argument("--max_images", type=flags.positive_int, default=None,
                      help="Caption at most this many images in this run, e.g. to check the captions before a long run "
                           "(the same command without it continues with the rest).")

    trigger = p.add_argument_group("trigger")
    trigger.add_argument("--instance_token", default=None,
                         help="Trigger word put in every caption, e.g. '[V]' (the reference's concept token); none by default.")
    trigger.add_argument("--class_noun", default=None,
                         help="Class of the subject in English, e.g. 'dog': the VLM is asked to call the subject so, the "
                              "trigger goes before it ('a brown [V] dog'), and the rows get it as class_name.")
    trigger.add_argument("--class_noun_zh", default=None,
                         help="The class noun in Chinese, e.g. '狗', placed like --class_noun in the Chinese captions.")
    trigger.add_argument("--concept_mode", choices=["object", "style"], default="object",
                         help="object: a subject, the trigger phrase is 'TOKEN NOUN'; style: the trigger phrase is "
                              "'TOKEN style' and the VLM is told not to describe the style.")
    trigger.add_argument("--trigger_placement", choices=["auto", "prefix", "suffix"], default="auto",
                         help="auto: before the caption's first mention of the class noun, else at the start (object "
                              "mode), at the start (style mode); prefix: 'PHRASE, caption'; suffix: 'caption, PHRASE'.")

    model = p.add_argument_group("model")
    model.add_argument("--vlm_name_or_path", default=DEFAULT_VLM, type=flags.text,
                       help="Qwen3-VL Instruct model that writes the captions, a Hub id or local folder; any size, e.g. "
                            "Qwen/Qwen3-VL-8B-Instruct.")
    model.add_argument("--revision", default=None, type=flags.text, help="Revision of --vlm_name_or_path on the Hub.")
    model.add_argument("--cache_dir", default=None, type=flags.text, help="Cache folder for the downloaded model.")
    model.add_argument("--min_pixels", type=flags.positive_int, default=256 * 256,
                       help="Smallest pixel budget of the VLM's view of an image.")
    model.add_argument("--max_pixels", type=flags.positive_int, default=1024 * 1024,
                       help="Largest pixel budget of the VLM's view of an image; about one visual token per 32x32 pixels.")
    model.add_argument("--max_new_tokens", type=flags.positive_int, default=None,
                       help="Most tokens generated per caption (default: per granularity, short 48, medium 128, detailed "
                            "384, user_prompt 64). A caption that hits it is cut after its last full sentence.")
    model.add_argument("--extra_instruction", default=None,
                       help="Text added to every request to the VLM, e.g. 'Do not mention the colour of the fur.'")

    runtime = p.add_argument_group("runtime")
    runtime.add_argument("--batch_size", type=flags.positive_int, default=8,
                         help="Images captioned together in one generate call; metadata.jsonl is saved after each batch.")
    runtime.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                         help="Weight dtype of the VLM (default: bf16 on a GPU, no (fp32) on CPU).")
    runtime.add_argument("--device", default=None, type=flags.text,
                         help="Torch device, e.g. cuda, cuda:1 or cpu; 'auto' spreads a large model over every GPU "
                              "(default: cuda if available, else cpu).")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# Captions: the request, the clean-up and the trigger, all without a model


@dataclass
class Trigger:
    """Where the trigger goes. Placement is done here, deterministically, whatever the VLM wrote."""

    token: str | None = None
    noun: str | None = None
    noun_zh: str | None = None
    mode: str = "object"
    placement: str = "auto"

    def phrase(self, language: str) -> str:
        if self.mode == "style":
            return f"{self.token} style" if language == "en" else f"{self.token}风格"
        noun = self.noun_zh if language == "zh" and self.noun_zh else self.noun
        if not noun:
            return self.token
        return f"{self.token}{noun}" if language == "zh" and self.noun_zh else f"{self.token} {noun}"

    def _noun_position(self, caption: str, language: str) -> int | None:
        if language == "zh" and self.noun_zh:
            index = caption.find(self.noun_zh)
            return index if index >= 0 else None
        if language == "en" and self.noun:
            match = re.search(rf"(?<!\w){re.escape(self.noun)}(?:e?s)?(?!\w)", caption, re.IGNORECASE)
            return match.start() if match else None
        return None

    def place(self, caption: str, language: str) -> str:
        """The caption with the trigger in it: already there, before the class noun, or as a prefix or suffix."""
        if not self.token or self.token in caption:
            return caption
        placement = self.placement
        if placement == "auto":
            position = self._noun_position(caption, language) if self.mode == "object" else None
            if position is not None:
                space = "" if language == "zh" else " "
                return f"{caption[:position]}{self.token}{space}{caption[position:]}"
            placement = "prefix"
        phrase, separator = self.phrase(language), SEPARATOR[language]
        if not caption:
            return phrase
        if placement == "prefix":
            return f"{phrase}{separator}{caption}"
        return f"{caption.rstrip('.。')}{separator}{phrase}"


def instruction(field_name: str, trigger: Trigger, extra: str | None) -> str:
    """The request for one caption field (the trigger itself is never shown to the VLM)."""
    granularity, language = field_name.rsplit("_", 1)
    parts = [GRANULARITIES[granularity][language], ANSWER_RULES[language]]
    if trigger.mode == "style":
        parts.append(STYLE_RULES[language])
    elif language == "zh" and trigger.noun_zh:
        parts.append(f"把画面的主体称为“{trigger.noun_zh}”。")
    elif trigger.noun:
        parts.append(f'Call the main subject "{trigger.noun}".' if language == "en"
                     else f"画面的主体是“{trigger.noun}”，请用对应的中文词称呼它。")
    if extra:
        parts.append(extra)
    return " ".join(parts) if language == "en" else "".join(parts)


_LABEL = re.compile(r"^\W*(?:short |medium |detailed )?(?:caption|description|prompt|标题|描述|提示词)\W*?[:：]\s*", re.IGNORECASE)
_QUOTES = [('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("「", "」"), ("『", "』"), ("«", "»")]


def clean_caption(text: str) -> str:
    """One line of plain text: reasoning, labels, surrounding quotes and control characters removed.

    Every run of whitespace becomes one space, line and paragraph separators included: U+2028, U+0085 and the like,
    written raw into the JSON line, would split it for readers that split at them (str.splitlines).
    """
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    text = text.replace("<think>", " ")
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text)
    text = " ".join(text.split())
    text = _LABEL.sub("", text)
    for left, right in _QUOTES:
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            text = text[len(left) : -len(right)].strip()
    return text


def cut_to_last_sentence(text: str) -> str:
    """A caption that ran into the token limit, cut after its last full sentence when that keeps most of it."""
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[: ends[-1]].strip() if ends and ends[-1] >= len(text) // 2 else text


def fallback_caption(field_name: str, row: dict, trigger: Trigger) -> str:
    """A caption for a field the VLM left empty: the nearest granularity of the same language, else a plain phrase."""
    granularity, language = field_name.rsplit("_", 1)
    length = {"user_prompt": 0, "short": 1, "medium": 2, "detailed": 3}  # from the briefest to the longest
    for other in sorted(length, key=lambda g: (abs(length[g] - length[granularity]), length[g])):
        value = row.get(f"{other}_{language}")
        if other != granularity and isinstance(value, str) and value.strip():
            return trigger.place(value, language)
    if language == "zh":
        plain = f"一张{trigger.noun_zh}的照片" if trigger.noun_zh and trigger.mode == "object" else "一张照片"
    else:
        plain = f"a photo of a {trigger.noun}" if trigger.noun and trigger.mode == "object" else "a photo"
    return trigger.place(plain, language)


# ----------------------------------------------------------------------------------------------------------------------
# The folder and its metadata.jsonl


def _inside(root: Path, relative: str, where: str) -> Path:
    """The trainer's rule: a row's file_name is a path relative to the folder and stays inside it."""
    try:
        resolved = (root / relative).resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError up to Python 3.12)
        raise UserError(f"{where}: {relative!r} is a symlink loop: replace it with the file itself.") from None
    if Path(relative).is_absolute() or not resolved.is_relative_to(root.resolve()):
        raise UserError(f"{where}: path {relative!r} points outside the dataset folder: use a path relative to {root}.")
    return resolved


class Metadata:
    """metadata.jsonl as lines: the ones this run does not change are written back as they were read."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / METADATA
        # Write through a symlink to its target, so the link stays a link.
        self.target = self.path.resolve() if self.path.is_symlink() else self.path
        self.lines: list[str] = []
        self.rows: dict[int, dict] = {}  # line index -> row
        self.images: dict[int, Path] = {}  # line index -> resolved image path
        self.existed = self.path.exists()
        if self.existed:
            self._read()

    def _read(self):
        try:
            # A byte-order mark (Windows editors) is accepted, as the trainer accepts it; it is not written back.
            text = self.path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise UserError(f"{self.path} is not UTF-8 text: re-save it as UTF-8.") from None
        except OSError as error:
            raise UserError(f"cannot read {self.path} ({error.strerror}).") from None
        # As the trainer splits JSON Lines: at \n only (str.splitlines would also split inside a caption at U+2028).
        self.lines = [line.rstrip("\r") for line in text.split("\n")]
        if self.lines and not self.lines[-1]:
            self.lines.pop()  # the newline that ends the last line starts no line of its own
        for index, line in enumerate(self.lines):
            if not line.strip():
                continue
            where = f"{self.path}:{index + 1}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{where} is not valid JSON: fix or delete the line.") from None
            if not isinstance(row, dict):
                raise UserError(f"{where} is a JSON {type(row).__name__}, not an object: write one "
                                '{"file_name": "01.jpg", ...} per line.')
            if "file_name" not in row:
                raise UserError(f"{where} has no 'file_name': add the image path relative to {self.root}.")
            name = row["file_name"]
            if not isinstance(name, str) or not name.strip() or "\0" in name:
                raise UserError(f"{where}: 'file_name' must be the image's path relative to {self.root}, got {name!r}.")
            self.rows[index] = row
            self.images[index] = _inside(self.root, name, where)

    def update(self, index: int, row: dict):
        self.rows[index] = row
        self.lines[index] = json.dumps(row, ensure_ascii=False)

    def append(self, row: dict, image: Path) -> int:
        self.lines.append(json.dumps(row, ensure_ascii=False))
        index = len(self.lines) - 1
        self.rows[index], self.images[index] = row, image
        return index

    def save(self):
        """Write every line to a temporary file, flush it to disk and rename it over metadata.jsonl: a reader, or the
        next run after a kill, sees the old file or the new one, never half of one."""
        temporary = self.target.with_name(f".{self.target.name}.{os.getpid()}.tmp")
        data = "".join(line + "\n" for line in self.lines).encode("utf-8")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if self.target.exists():
            shutil.copymode(self.target, temporary)
        os.replace(temporary, self.target)
        _fsync_folder(self.target.parent)


def _fsync_folder(folder: Path):
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the rename itself is still atomic
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class FolderLock:
    """One captioning run per folder at a time (two would each rewrite metadata.jsonl from their own copy)."""

    def __init__(self, root: Path):
        self.path = root / f".{METADATA}.lock"
        self.handle = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock
            return self
        try:
            self.handle = open(self.path, "w")
        except OSError as error:
            raise UserError(f"cannot write in --instance_data_dir {self.path.parent} ({error.strerror}): the captions go "
                            "to its metadata.jsonl, so the folder must be writable.") from None
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            self.handle = None
            raise UserError(f"another caption_dopsd.py is writing {self.path.parent / METADATA}: wait for it to finish.") from None
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()


def remove_stale_temporaries(target: Path):
    """Temporary files of runs killed while saving (only ever ours: the lock is held)."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def read_txt_caption(image: Path, root: Path) -> str | None:
    path = image.with_suffix(".txt")
    if not path.is_file():
        return None
    # The trainer's rule for every file of the folder: a caption linked from outside would carry outside text into
    # the row's 'text', and from there into the model card.
    if not path.resolve().is_relative_to(root.resolve()):
        raise UserError(f"caption file {path} points outside the dataset folder (to {path.resolve()}): copy the file into {root}.")
    try:
        return path.read_text(encoding="utf-8-sig").strip() or None
    except UnicodeDecodeError:
        raise UserError(f"caption {path} is not UTF-8 text: re-save it as UTF-8 (it is copied into the row's 'text').") from None
    except OSError as error:
        raise UserError(f"cannot read caption {path} ({error.strerror}): make it readable or remove it.") from None


def folder_images(root: Path) -> list[Path]:
    images = sorted(p for p in root.iterdir() if p.is_file() and is_image_name(p))
    for image in images:  # the trainer refuses metadata rows whose file resolves outside the folder
        if not image.resolve().is_relative_to(root.resolve()):
            raise UserError(f"{image} links to {image.resolve()}, outside the folder, which a metadata.jsonl row cannot "
                            "name for the trainer: copy the file into the folder.")
    return [image.resolve() for image in images]


def backup_path(path: Path) -> Path:
    candidate, n = path.with_name(path.name + ".bak"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.bak{n}")
    return candidate


@dataclass
class Job:
    """One row to complete: its line in metadata.jsonl (None for a new row), its image and the fields it lacks."""

    index: int | None
    image: Path
    row: dict
    missing: list[str]
    txt_caption: str | None = None


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    kept: int = 0  # rows that already hold every requested field
    missing_images: list[str] = field(default_factory=list)


def finish_row(row: dict, fields: list[str], trigger: Trigger, txt_caption: str | None) -> dict:
    """The row with what needs no model: 'text' (the .txt caption, else a copy of the first field) when the row has
    no default caption yet, and class_name."""
    row = dict(row)
    if not any(row.get(k) for k in DEFAULT_CAPTION_KEYS):
        text = txt_caption or row.get(fields[0])
        if text:
            row["text"] = text
    if trigger.noun and "class_name" not in row:
        row["class_name"] = trigger.noun
    return row


def plan_work(metadata: Metadata, fields: list[str]) -> Plan:
    plan = Plan()
    listed = set()
    for index, row in metadata.rows.items():
        image = metadata.images[index]
        listed.add(image)
        if not image.is_file():
            plan.missing_images.append(str(row["file_name"]))
            continue
        missing = [f for f in fields if not row.get(f)]
        if missing:
            plan.jobs.append(Job(index, image, row, missing, read_txt_caption(image, metadata.root)))
        else:  # a row that holds every requested field is left exactly as it is
            plan.kept += 1
    for image in folder_images(metadata.root):
        if image not in listed:
            plan.jobs.append(Job(None, image, {"file_name": image.relative_to(metadata.root.resolve()).as_posix()},
                                 list(fields), read_txt_caption(image, metadata.root)))
    return plan


def strip_for_overwrite(metadata: Metadata, fields: list[str]) -> int:
    """Remove the requested fields from every row (and 'text' where it is a copy of the first field); returns how many
    rows changed."""
    changed = 0
    for index, row in list(metadata.rows.items()):
        stripped = {k: v for k, v in row.items() if k not in fields}
        if "text" in row and row.get("text") == row.get(fields[0]):
            stripped.pop("text")
        if stripped != row:
            metadata.update(index, stripped)
            changed += 1
    return changed


# ----------------------------------------------------------------------------------------------------------------------
# Checks that need no weights


def parse_fields(value: str) -> list[str]:
    fields = list(dict.fromkeys(f.strip() for f in value.split(",") if f.strip()))
    unknown = [f for f in fields if f not in FIELDS]
    if unknown or not fields:
        raise UserError(f"--caption_fields: unknown field {', '.join(unknown) or '(none given)'}; choose from {', '.join(FIELDS)}.")
    return fields


def check_args(args) -> tuple[Path, list[str], Trigger]:
    if args.min_pixels > args.max_pixels:
        raise UserError(f"--min_pixels {args.min_pixels} is above --max_pixels {args.max_pixels}: lower the first or raise the second.")
    fields = parse_fields(args.caption_fields)
    token = args.instance_token.strip() if args.instance_token is not None else None
    if args.instance_token is not None and not token:
        raise UserError("--instance_token is empty: pass the trigger word, e.g. '[V]', or leave the flag out.")
    if args.trigger_placement != "auto" and not token:
        raise UserError(f"--trigger_placement {args.trigger_placement} places --instance_token: pass one, e.g. '[V]'.")
    if args.concept_mode == "style" and not token:
        raise UserError("--concept_mode style builds the trigger phrase '[V] style' from --instance_token: pass one.")
    noun = args.class_noun.strip() if args.class_noun else None
    noun_zh = args.class_noun_zh.strip() if args.class_noun_zh else None
    trigger = Trigger(token, noun or None, noun_zh or None, args.concept_mode, args.trigger_placement)
    root = Path(args.instance_data_dir)
    if not root.is_dir():
        raise UserError(f"--instance_data_dir {root} does not exist or is not a folder.")
    return root, fields, trigger


def check_vlm(args):
    """The model's config can be read and is a Qwen3-VL: a typo or a missing download fails before anything loads."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(args.vlm_name_or_path, revision=args.revision, cache_dir=args.cache_dir)
    except Exception as error:  # noqa: BLE001 -- not found, offline, not a transformers model: one user problem
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read the config of --vlm_name_or_path {args.vlm_name_or_path} ({first_line}): pass a "
                        f"Qwen3-VL Instruct model id, e.g. {DEFAULT_VLM}, or a local folder with its config.json.") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"--vlm_name_or_path {args.vlm_name_or_path} is a {config.model_type} model, not Qwen3-VL: pass a "
                        f"Qwen3-VL Instruct model, e.g. {DEFAULT_VLM} or Qwen/Qwen3-VL-8B-Instruct.")


def check_images(jobs: list[Job], skip_bad: bool) -> list[Job]:
    """Open every image to caption (the trainer's own reader: EXIF orientation, transparency on white) before the model
    loads, so a broken file stops the run now, named."""
    from dopsd_args import UserError as DataError
    from dopsd_data import open_image

    readable = []
    for job in jobs:
        try:
            open_image(job.image, str(job.image))
        except DataError as error:
            if not skip_bad:
                raise UserError(str(error)) from None
            logger.warning("skipping unreadable image %s", job.image)
            continue
        readable.append(job)
    return readable


# ----------------------------------------------------------------------------------------------------------------------
# The captioner


class Captioner:
    """A Qwen3-VL Instruct model and its processor, generating greedily for a batch of images and one request."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.processor.tokenizer.padding_side = "left"  # decoder-only batched generation
        tokenizer = processor.tokenizer
        ends = model.generation_config.eos_token_id
        ends = [ends] if isinstance(ends, int) else list(ends or [])
        self.end_ids = {i for i in [*ends, tokenizer.eos_token_id, tokenizer.pad_token_id] if i is not None}

    @classmethod
    def from_pretrained(cls, args, dtype):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        common = dict(revision=args.revision, cache_dir=args.cache_dir)
        try:
            # The pixel budget of the image view (transformers 5: size={shortest_edge, longest_edge}, in pixels).
            processor = AutoProcessor.from_pretrained(
                args.vlm_name_or_path, size={"shortest_edge": args.min_pixels, "longest_edge": args.max_pixels}, **common)
            placement = {"device_map": "auto"} if args.device == "auto" else {}
            model = AutoModelForImageTextToText.from_pretrained(args.vlm_name_or_path, dtype=dtype, **placement, **common)
        except Exception as error:  # noqa: BLE001
            raise UserError(f"cannot load --vlm_name_or_path {args.vlm_name_or_path} ({type(error).__name__}: {error}).") from None
        if args.device != "auto":
            model.to(args.device)
        return cls(model.eval(), processor)

    def generate(self, images, request: str, max_new_tokens: int) -> list[tuple[str, bool]]:
        """(decoded text, whether it ended by itself rather than at the token limit) for each image."""
        import torch

        conversations = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": request}]}]
                         for image in images]
        inputs = self.processor.apply_chat_template(
            conversations, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True},
        ).to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        config = copy.deepcopy(self.model.generation_config)
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
        config.max_new_tokens = max_new_tokens
        if config.pad_token_id is None:
            config.pad_token_id = self.processor.tokenizer.pad_token_id
        with torch.inference_mode():
            generated = self.model.generate(**inputs, generation_config=config)
        new = generated[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        ended = [any(int(t) in self.end_ids for t in row) for row in new]
        return list(zip(texts, ended))


@dataclass
class Report:
    written: int = 0
    empty: list[str] = field(default_factory=list)
    cut: int = 0
    example: dict | None = None


def caption_batch(captioner: Captioner, jobs: list[Job], fields: list[str], trigger: Trigger, args, report: Report):
    """Generate every missing field of a batch of rows; returns the finished rows, in order."""
    from dopsd_data import open_image

    images = {id(job): open_image(job.image, str(job.image)) for job in jobs}
    rows = [dict(job.row) for job in jobs]
    empty_fields: list[list[str]] = [[] for _ in jobs]
    for field_name in fields:
        todo = [i for i, job in enumerate(jobs) if field_name in job.missing]
        if not todo:
            continue
        granularity, language = field_name.rsplit("_", 1)
        limit = args.max_new_tokens or GRANULARITIES[granularity]["max_new_tokens"]
        outputs = captioner.generate([images[id(jobs[i])] for i in todo], instruction(field_name, trigger, args.extra_instruction), limit)
        for i, (text, ended) in zip(todo, outputs):
            caption = clean_caption(text)
            if caption and not ended:
                shorter = cut_to_last_sentence(caption)
                report.cut += shorter != caption
                caption = shorter
            if caption:
                rows[i][field_name] = trigger.place(caption, language)
            else:
                empty_fields[i].append(field_name)
    finished = []
    for job, row, empties in zip(jobs, rows, empty_fields):
        for field_name in empties:  # after the others, so that a sibling granularity can stand in
            row[field_name] = fallback_caption(field_name, row, trigger)
            report.empty.append(f"{row['file_name']}:{field_name}")
        finished.append(finish_row(row, fields, trigger, job.txt_caption))
    return finished


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = make_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    root, fields, trigger = check_args(args)
    with FolderLock(root):
        return run(args, root, fields, trigger)


def run(args, root: Path, fields: list[str], trigger: Trigger):
    metadata = Metadata(root)
    remove_stale_temporaries(metadata.target)
    if args.overwrite_captions and metadata.existed:
        changed = strip_for_overwrite(metadata, fields)
    plan = plan_work(metadata, fields)
    if not plan.jobs and not plan.kept:
        raise UserError(no_images_message(root))
    for name in plan.missing_images[:5]:
        logger.warning("%s lists %s, which is not in the folder: row kept as it is (the trainer will stop on it).", METADATA, name)
    jobs = plan.jobs[: args.max_images] if args.max_images is not None else plan.jobs
    left = len(plan.jobs) - len(jobs)
    if not jobs:
        print(f"nothing to caption: the {plan.kept} rows of {metadata.path} hold {', '.join(fields)}.")
        return metadata.path

    check_vlm(args)
    jobs = check_images(jobs, args.skip_bad_images)
    if args.overwrite_captions and metadata.existed:
        backup = backup_path(metadata.target)
        shutil.copy2(metadata.target, backup)
        print(f"--overwrite_captions: the old {METADATA} is kept as {backup.name}; {changed} rows will be captioned again.")
        metadata.save()
    report = Report()
    if jobs:
        caption_with_model(args, metadata, jobs, fields, trigger, report)

    if report.empty:
        logger.warning("%d captions came back empty and were filled from another granularity or a plain phrase: %s",
                       len(report.empty), ", ".join(report.empty[:5]) + (" ..." if len(report.empty) > 5 else ""))
    if report.cut:
        logger.warning("%d captions reached the token limit and were cut after their last full sentence "
                       "(raise --max_new_tokens to keep them whole).", report.cut)
    print(f"wrote {report.written} captioned rows to {metadata.path} ({plan.kept} rows already complete"
          + (f", {left} images left for the next run" if left > 0 else "") + ").")
    if report.example:
        print("example row: " + json.dumps(report.example, ensure_ascii=False))
    print(f"train with: --instance_data_dir {root} --caption_column {','.join(fields)}")
    return metadata.path


def _store(metadata: Metadata, job: Job, row: dict):
    if job.index is None:
        job.index = metadata.append(row, job.image)
    else:
        metadata.update(job.index, row)


def caption_with_model(args, metadata: Metadata, jobs: list[Job], fields, trigger, report: Report):
    import torch
    from tqdm import tqdm

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise UserError(f"--device {args.device} is not a torch device: use cuda, cuda:N, cpu or auto.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu.")
    on_gpu = torch.cuda.is_available() if args.device == "auto" else not args.device.startswith("cpu")
    precision = args.mixed_precision or ("bf16" if on_gpu else "no")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    captioner = Captioner.from_pretrained(args, dtype)
    progress = tqdm(total=len(jobs), unit="image", desc="captioning", dynamic_ncols=True)
    try:
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start : start + args.batch_size]
            try:
                rows = caption_batch(captioner, batch, fields, trigger, args, report)
            except torch.OutOfMemoryError:
                raise UserError(f"out of GPU memory with --batch_size {args.batch_size}: lower --batch_size or --max_pixels "
                                f"(the {report.written} rows captioned so far are saved).") from None
            for job, row in zip(batch, rows):
                _store(metadata, job, row)
            metadata.save()
            report.written += len(batch)
            report.example = report.example or rows[0]
            progress.update(len(batch))
    except KeyboardInterrupt:
        progress.close()
        print(f"\ninterrupted: {report.written} of {len(jobs)} images captioned and saved in {metadata.path}; run the "
              "same command again to continue" + (" (without --overwrite_captions)" if args.overwrite_captions else "") + ".",
              file=sys.stderr)
        sys.exit(130)
    progress.close()


def run_main(main_function=main):
    try:
        main_function()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_main()
