# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""What the model is trained on: images and captions from a folder or a dataset, checked before any model loads,
cropped into aspect-ratio buckets and batched one bucket at a time; and their conditions, computed once and cached."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from dopsd_args import UserError
from dopsd_folders import is_image_name, no_images_message
from pipeline_dopsd import ModelFamily

logger = logging.getLogger("dopsd")

# The caption (an edit's instruction) of a row when no --caption_column is given: the first of these it has.
DEFAULT_CAPTION_KEYS = ("text", "caption", "prompt", "instruction")


class RawExample(NamedTuple):
    """A training row as read, before any image is opened: the target image (a path or PIL image), its captions and,
    for an edit, its source images in order."""

    name: str
    image: object
    captions: list[str]
    sources: tuple = ()


@dataclass
class Example:
    """One training image, already cropped to its bucket, with its candidate captions (one per caption column) and,
    for an edit, its source images (each cropped to its own bucket).

    `image` and `sources` are dropped once the conditions are cached (thousands of images need not stay in memory);
    their sizes and `digest`s (hashes of the pixels, for the condition cache) remain.
    """

    name: str
    image: Image.Image | None
    captions: list[str]
    sources: list[Image.Image] | None = None
    size: tuple[int, int] = (0, 0)
    digest: str = ""
    source_sizes: tuple[tuple[int, int], ...] = ()
    source_digest: str = ""

    def __post_init__(self):
        if self.image is not None:
            self.size = self.image.size
            self.digest = hashlib.sha256(self.image.tobytes()).hexdigest()
        if self.sources:
            self.source_sizes = tuple(source.size for source in self.sources)
            self.source_digest = _pixels_digest(self.sources)

    @property
    def layout(self) -> tuple:
        """What must be equal across a batch: the target's size and the sizes of the sources (so their number too), as
        the transformer takes one token layout per batch."""
        return self.size, self.source_sizes


def _pixels_digest(images) -> str:
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def open_image(path_or_image, name: str) -> Image.Image:
    """An RGB image with EXIF orientation applied; transparency is composited on white."""
    try:
        image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 -- PIL raises many types for broken files
        raise UserError(f"cannot read image {name} ({type(error).__name__}: {error}): replace it or pass --skip_bad_images.") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array / (65535.0 if array.max() > 255 else 255.0) * 255.0, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


# -- one rule for every file and caption read from the data -----------------------------------------------------------


def _contained(root: Path, path: Path, what: str) -> Path:
    """`path` with its symlinks resolved, refused unless it stays inside the data folder. Every file read from
    --instance_data_dir (metadata.jsonl, the images it names, the images of the folder, .txt captions) goes through
    here: a link out of the folder would put outside text into the model card that --push_to_hub uploads."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError up to Python 3.12)
        raise UserError(f"{what} {path} is a symlink loop: replace it with the file itself.") from None
    if not resolved.is_relative_to(root.resolve()):
        raise UserError(f"{what} {path} points outside the dataset folder (to {resolved}): copy the file into {root}.")
    return resolved


def _caption(value, where: str, fix: str) -> str:
    """One rule for every caption (a .txt file, a metadata.jsonl field, a dataset column): text with something in it."""
    if not isinstance(value, str):
        raise UserError(f"{where} is a {type(value).__name__}, not text: write the caption as a string.")
    if "\0" in value:
        raise UserError(f"{where} holds a NUL character (a binary or UTF-16 file?): {fix}.")
    caption = value.strip()
    if not caption:
        raise UserError(f"{where} is empty: {fix}.")
    return caption


def _read_text(path: Path, what: str) -> str:
    """A UTF-8 file's text (a byte-order mark, as Windows editors write it, is accepted and dropped)."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder: it must be a UTF-8 text file.")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {what} {path} ({error.strerror}): make it readable or remove it.") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {error.start}): re-save it as UTF-8.") from None


def _read_caption(root: Path, path: Path) -> str:
    path = _contained(root, path, "caption file")
    return _caption(_read_text(path, "caption"), f"caption file {path}",
                    "write a caption or delete the file to use --instance_prompt")


def _names(value: str | None) -> list[str]:
    """The names of a comma-separated column flag (--caption_column, --source_image_column)."""
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def _caption_columns(args) -> list[str] | None:
    return _names(args.caption_column) or None


def _row_captions(row: dict, columns, where: str) -> tuple[list[str], list[str]]:
    """(captions, missing columns) of one metadata or dataset row. With --caption_column every listed column the row
    has counts (a row lacking some uses its others); without it, the first of text, caption, prompt. A null value
    counts as absent."""
    keys = columns or [k for k in DEFAULT_CAPTION_KEYS if row.get(k) is not None][:1]
    present = [k for k in keys if row.get(k) is not None]
    captions = [_caption(row[k], f"{where}: '{k}'", f"write a caption or remove '{k}'") for k in present]
    return captions, [k for k in keys if k not in present]


def collect_raw_examples(args) -> list[RawExample]:
    """Every training row (target, captions, and an edit's sources), checked before any model is loaded (a dataset's
    rows are checked as they are read, still before any model is loaded)."""
    columns = _caption_columns(args)
    if args.instance_data_dir is not None:
        return _folder_examples(Path(args.instance_data_dir), columns, args.instance_prompt, _task(args))
    return _dataset_examples(args, columns)


def _task(args) -> str:
    return getattr(args, "task", "text-to-image")  # caption_dopsd.py reads folders too, and has no --task


def json_lines(text: str, source, example: str, separator: str = ":"):
    """(line index, f"{source}{separator}{line}", row) for every non-blank line of a JSON Lines text (metadata.jsonl,
    an eval file), each line checked to be one JSON object; `example` shows a good line in the error."""
    # JSON Lines are separated by \n only: str.splitlines would also split inside a caption holding U+2028.
    for index, line in enumerate(text.split("\n")):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{source}{separator}{index + 1}"
        if "\0" in line:
            raise UserError(f"{where} holds a NUL byte (is the file UTF-16 or binary?): re-save {Path(source).name} as UTF-8 text.")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{where} is not valid JSON ({error.msg}): fix the line.") from None
        if not isinstance(row, dict):
            raise UserError(f"{where} is a JSON {type(row).__name__}, not an object: write one {example} per line.")
        yield index, where, row


def _data_path(root: Path, name, where: str, field: str) -> Path:
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise UserError(f"{where}: '{field}' must be the image's path relative to {root}, got {name!r}.")
    if Path(name).is_absolute():
        raise UserError(f"{where}: path {name!r} points outside the dataset folder: use a path relative to {root}.")
    return _contained(root, root / name, f"{where}: '{field}'")


def _image_file(root: Path, name, where: str, field: str) -> Path:
    """`_data_path`, and it must name an existing file."""
    image = _data_path(root, name, where, field)
    if image.is_dir():
        raise UserError(f"{where}: '{field}' {name!r} is a folder: name an image file.")
    if not image.exists():
        raise UserError(f"{where}: '{field}' {name!r} does not exist in {root}: fix the path or delete the line.")
    return image


# The field of metadata.jsonl naming an edit's source image (or a list of them, in order); the target is 'file_name'.
SOURCE_FIELD = "source_image"
# The reference implementation's edit rows: one list of paths, the sources in order and then the target.
REFERENCE_PATH_FIELDS = ("local_path_list", "local_paths", "image_path_list", "image_paths")


def _target_file(root: Path, row: dict, where: str) -> Path:
    if "file_name" not in row:
        raise UserError(f"{where} has no 'file_name': add the image path relative to {root}.")
    return _image_file(root, row["file_name"], where, "file_name")


def _edit_images(root: Path, row: dict, where: str) -> tuple[Path, tuple[Path, ...]]:
    """(target, sources) of one edit row: 'file_name' and 'source_image' (a path or a list of paths, in order), or the
    reference's single list of paths."""
    listed = next((field for field in REFERENCE_PATH_FIELDS if field in row), None)
    if listed is not None and "file_name" not in row:
        names = row[listed]
        if not isinstance(names, list) or len(names) < 2:
            raise UserError(f"{where}: '{listed}' must list the source image(s) and then the target, got {names!r}.")
        paths = [_image_file(root, name, where, listed) for name in names]
        return paths[-1], tuple(paths[:-1])
    if row.get(SOURCE_FIELD) is None:
        raise UserError(f"{where} has no '{SOURCE_FIELD}': name the image to edit, e.g. \"{SOURCE_FIELD}\": \"before/01.png\" "
                        "(a list for several sources; the edited target goes in 'file_name').")
    names = row[SOURCE_FIELD]
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not names:
        raise UserError(f"{where}: '{SOURCE_FIELD}' must be a path or a list of paths relative to {root}, got {names!r}.")
    return _target_file(root, row, where), tuple(_image_file(root, name, where, SOURCE_FIELD) for name in names)


def _metadata_rows(root: Path, metadata: Path, task: str) -> list[tuple[str, dict, Path, tuple[Path, ...]]]:
    """(where, row, image, sources) for every row of metadata.jsonl, each row checked: one JSON object per line whose
    'file_name' is a path relative to the folder naming an image file inside it, listed once; an edit's row also
    names its sources."""
    text = _read_text(_contained(root, metadata, "metadata file"), "metadata file")
    if task == "edit":
        example = f'{{"{SOURCE_FIELD}": "before/01.jpg", "file_name": "after/01.jpg", "text": "..."}}'
    else:
        example = '{"file_name": "01.jpg", "text": "..."}'
    rows, seen = [], {}
    for index, where, row in json_lines(text, metadata, example=example):
        if task == "edit":
            image, sources = _edit_images(root, row, where)
        elif any(row.get(field) is not None for field in (SOURCE_FIELD, *REFERENCE_PATH_FIELDS)):
            raise UserError(f"{where} names source images, which only an edit has: pass --task edit to train an editing "
                            f"LoRA, or remove '{SOURCE_FIELD}'.")
        else:
            image, sources = _target_file(root, row, where), ()
        if (image, sources) in seen:
            raise UserError(f"{where} lists {row.get('file_name', image.name)!r} again (first at line {seen[image, sources]}): "
                            "merge the two rows.")
        seen[image, sources] = index + 1
        rows.append((where, row, image, sources))
    if not rows:
        raise UserError(f"{metadata} is empty: add one {example} line per {'edit' if task == 'edit' else 'image'}"
                        + ("." if task == "edit" else ", or delete it to use .txt captions and --instance_prompt."))
    return rows


def _folder_examples(root: Path, columns, instance_prompt, task: str):
    if not root.is_dir():
        raise UserError(f"--instance_data_dir {root} does not exist or is not a folder.")
    metadata = root / "metadata.jsonl"
    rows = []
    if metadata.exists() or metadata.is_symlink():
        entries = _metadata_rows(root, metadata, task)
        fields = {key for _, row, _, _ in entries for key in row}
        if columns and (unknown := [c for c in columns if c not in fields]):
            raise UserError(f"--caption_column {','.join(unknown)} matches no field of {metadata} (fields: "
                            f"{', '.join(sorted(fields))}): fix the name.")
        partial = 0
        for where, row, path, sources in entries:
            captions, missing = _row_captions(row, columns, where)
            partial += bool(captions and missing)
            rows.append(RawExample(str(path), path, captions or ([instance_prompt] if instance_prompt else []), sources))
        if partial:
            logger.warning("%d rows of %s lack some of --caption_column %s: they train on their other listed captions.",
                           partial, metadata, ",".join(columns))
    elif task == "edit":
        raise UserError(f"--task edit reads its edits from {metadata}: write one line per edit, "
                        f'{{"{SOURCE_FIELD}": "before/01.png", "file_name": "after/01.png", "text": "the instruction"}}.')
    else:
        try:
            listing = sorted(root.iterdir())
        except OSError as error:
            raise UserError(f"cannot list --instance_data_dir {root} ({error.strerror}): fix its permissions.") from None
        for path in listing:
            if not is_image_name(path):
                continue
            image = _contained(root, path, "image")
            if image.is_dir():
                continue
            if not image.exists():
                raise UserError(f"image {path} is a link to a missing file: fix the link or remove it.")
            caption_file = path.with_suffix(".txt")
            has_caption = caption_file.exists() or caption_file.is_symlink()
            captions = [_read_caption(root, caption_file)] if has_caption else ([instance_prompt] if instance_prompt else [])
            rows.append(RawExample(str(path), path, captions))
    if not rows:
        raise UserError(no_images_message(root))
    for row in rows:
        if not row.captions and row.sources:
            raise UserError(f"{row.name} has no instruction: add a 'text' field to its metadata.jsonl line (or pass "
                            "--caption_column, or --instance_prompt for one instruction for every edit).")
        if not row.captions:
            raise UserError(f"{row.name} has no caption: add a same-stem .txt file, a metadata.jsonl entry or --instance_prompt.")
    return rows


def _dataset_examples(args, columns):
    import datasets

    try:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train",
                                        streaming=args.dataset_streaming)
        names = dataset.column_names or list(next(iter(dataset)).keys())
    except Exception as error:  # noqa: BLE001
        raise UserError(f"cannot load --dataset_name {args.dataset_name} ({type(error).__name__}: {error}).") from None
    if args.image_column not in names:
        raise UserError(f"--image_column {args.image_column} is not a column of {args.dataset_name} (columns: {', '.join(names)}).")
    columns = columns or [c for c in DEFAULT_CAPTION_KEYS if c in names][:1]
    missing = [c for c in columns if c not in names]
    if missing:
        raise UserError(f"--caption_column {','.join(missing)} not in {args.dataset_name} (columns: {', '.join(names)}).")
    sources = _names(args.source_image_column) if _task(args) == "edit" else []
    if missing := [c for c in sources if c not in names]:
        raise UserError(f"--source_image_column {','.join(missing)} not in {args.dataset_name} (columns: {', '.join(names)}): "
                        "name the column(s) holding the images to edit.")
    return _dataset_rows(args, dataset, columns, sources)


def _dataset_rows(args, dataset, columns, source_columns=()):
    """Rows one at a time, so that a streamed dataset is never held whole in memory. An edit's sources are the
    --source_image_column values in order, a column holding a list of images giving all of its images."""
    for i, row in enumerate(dataset):
        where = f"row {i} of {args.dataset_name}"
        captions, _ = _row_captions(row, columns, where)
        captions = captions or ([args.instance_prompt] if args.instance_prompt else [])
        if not captions:
            raise UserError(f"{where} has no caption: pass --caption_column or --instance_prompt.")
        sources = []
        for column in source_columns:
            value = row[column]
            sources += list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]
        if source_columns and not sources:
            raise UserError(f"{where} has no source image in --source_image_column {','.join(source_columns)}: every edit "
                            "needs the image it edits.")
        yield RawExample(f"{args.dataset_name}[{i}]", row[args.image_column], captions, tuple(sources))


def _label(source) -> str:
    return Path(source).name if isinstance(source, (str, Path)) else type(source).__name__


def make_buckets(args) -> list[tuple[int, int]]:
    """The (height, width) buckets: --aspect_ratio_buckets (given for 1024) scaled by --resolution / 1024, to multiples of 16."""
    from diffusers.training_utils import parse_buckets_string

    try:
        base = parse_buckets_string(args.aspect_ratio_buckets)
    except ValueError as error:
        raise UserError(f"--aspect_ratio_buckets: {error}") from None
    scale = args.resolution / 1024
    return list(dict.fromkeys((max(16, round(h * scale / 16) * 16), max(16, round(w * scale / 16) * 16)) for h, w in base))


def crop_to_bucket(image: Image.Image, buckets) -> Image.Image:
    """Resize so the image covers the nearest-aspect bucket, then centre-crop to it."""
    from diffusers.training_utils import find_nearest_bucket

    height, width = buckets[find_nearest_bucket(image.height, image.width, buckets)]
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def load_examples(args, raw, family: type[ModelFamily]) -> list[Example]:
    """Open, check and bucket-crop every image (before heavy models are loaded, so a bad file fails fast).

    An edit's sources are cropped as its target is, each to its own nearest-aspect bucket: a source shaped like its
    target gets the same crop (the pixels stay aligned), and every size is one the stock pipeline takes as it is (a
    multiple of 16, at most 1 MP up to --resolution 1024), so the student sees exactly what inference on those sources
    sees."""
    buckets = make_buckets(args)
    examples = []
    for row in raw:
        named = [(row.name, row.image), *((f"{row.name} (source {n + 1}: {_label(s)})", s) for n, s in enumerate(row.sources))]
        try:
            images = [open_image(source, name) for name, source in named]
        except UserError:
            if not args.skip_bad_images:
                raise
            logger.warning("skipping unreadable image(s) of %s", row.name)
            continue
        cropped = []
        for (name, _), image in zip(named, images):
            if reason := family.check_reference_image(*image.size):
                raise UserError(f"{name}: {reason}; resize or remove it.")
            cropped.append(crop_to_bucket(image, buckets))
            if reason := family.check_reference_image(*cropped[-1].size):
                raise UserError(f"{name} goes to a {cropped[-1].size[0]}x{cropped[-1].size[1]} bucket at --resolution "
                                f"{args.resolution}: {reason}; raise --resolution.")
        examples.append(Example(row.name, cropped[0], row.captions, cropped[1:] or None))
    if not examples:
        raise UserError("no readable training images: check the data source (or --skip_bad_images skipped them all).")
    return examples


class BucketBatches:
    """Batches of examples from one bucket, with one caption column per batch; reshuffled every epoch with the seed.

    The order depends only on (seed, epoch), so the position (epoch, index) is all a checkpoint needs to resume it.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.num_captions = max(len(e.captions) for e in examples)
        self.epoch, self.index = 0, 0
        self._batches = self._epoch_batches()

    def _epoch_batches(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, example in enumerate(self.examples):
            groups.setdefault(example.layout, []).append(i)
        batches = []
        for indices in groups.values():
            rng.shuffle(indices)
            # Small sets fill a batch by repetition rather than dropping the bucket.
            while len(indices) % self.batch_size:
                indices.append(indices[rng.randrange(len(indices))])
            batches += [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        rng.shuffle(batches)
        while len(batches) % self.num_replicas:
            batches.append(batches[rng.randrange(len(batches))])
        return [(b, rng.randrange(self.num_captions)) for b in batches[self.rank :: self.num_replicas]]

    def __next__(self) -> tuple[list[int], int]:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._epoch_batches()
        batch = self._batches[self.index]
        self.index += 1
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]
        self._batches = self._epoch_batches()


def caption_of(example: Example, column: int) -> str:
    return example.captions[column % len(example.captions)]


def image_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return array[None]


def _source_part(example: Example) -> list[str]:
    """What an example's sources add to its cache keys: nothing without sources, so text-to-image entries keep the keys
    they had before edits existed and earlier caches stay valid."""
    return [example.source_digest] if example.source_digest else []


class ConditionCache:
    """Student and teacher conditions (and SFT target latents) for every (example, caption), computed once.

    With a folder, each entry is a safetensors file named by a hash of everything it depends on (model, teacher
    options, prompt, image pixels), loaded when a batch needs it: reused across runs and resumes, and recomputed when
    the model, the prompt or the image changes. Without one, entries stay in memory.
    """

    def __init__(self, directory: str | Path | None = None, fingerprint: str = ""):
        self.directory = Path(directory) if directory else None
        self.fingerprint = fingerprint
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.keys: dict[tuple, str] = {}
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _key(self, *parts) -> str:
        digest = hashlib.sha256(self.fingerprint.encode())
        for part in parts:
            digest.update(part if isinstance(part, bytes) else str(part).encode())
            digest.update(b"\0")
        return digest.hexdigest()[:32]

    def _has(self, key: str) -> bool:
        return key in self.memory or bool(self.directory and (self.directory / f"{key}.safetensors").exists())

    def _put(self, key: str, tensors: dict[str, torch.Tensor]):
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if self.directory is None:
            self.memory[key] = tensors
            return
        from safetensors.torch import save_file

        partial = self.directory / f".{key}.{os.getpid()}.partial"
        save_file(tensors, str(partial))
        os.replace(partial, self.directory / f"{key}.safetensors")

    def _get(self, key: str) -> dict[str, torch.Tensor]:
        if key in self.memory:
            return self.memory[key]
        from safetensors.torch import load_file

        return load_file(str(self.directory / f"{key}.safetensors"))

    def student(self, prompt: str, example: Example) -> dict[str, torch.Tensor]:
        """The student's condition for a prompt and the example's sources (none for text-to-image)."""
        return self._get(self.keys[("student", prompt, example.source_digest)])

    def teacher(self, index: int, caption: str) -> dict[str, torch.Tensor]:
        return self._get(self.keys[("teacher", index, caption)])

    def latents(self, index: int) -> torch.Tensor:
        return self._get(self.keys[("latents", index)])["latents"]

    def teacher_row(self, index: int) -> dict[str, torch.Tensor]:
        return self._get(self.keys[("teacher-row", index)])

    @torch.no_grad()
    def fill(self, family: ModelFamily, examples: list[Example], method: str, rows: list[Example] = (), device="cpu",
             rank: int = 0, world_size: int = 1):
        """Compute what is missing, one kind at a time with only that kind's encoders on `device` (so a 4B text
        encoder and a 4B VLM never sit on the GPU together, and nothing moves when the disk cache is complete).
        Ranks split the work when the cache is on disk; call after every rank has indexed, then wait for all."""
        todo = self.index(examples, method, rows)
        fitted = self.fit_captions(family, [*examples, *rows], method, warn=rank == 0)
        for kind in ("student", "teacher", "latents"):
            missing = [(n, entry) for n, entry in enumerate(todo) if entry[0] == kind and not self._has(entry[1])]
            mine = [entry for n, entry in missing if self.directory is None or n % world_size == rank]
            if not mine:
                continue
            encoders = family.encoders_for(kind)
            for module in encoders:
                module.to(device)
            for _, key, prompt, example in mine:
                sources = [example.sources] if example.sources else None
                if kind == "student":
                    self._put(key, family.encode_student([fitted[prompt]], sources)[0])
                elif kind == "teacher":
                    try:
                        condition = family.encode_teacher([fitted[prompt]], [example.image], sources)[0]
                    except ValueError as error:  # the Z-Image teacher's context is over the transformer's limit
                        raise UserError(f"{example.name}: {error}") from None
                    self._put(key, condition)
                else:
                    self._put(key, {"latents": family.encode_images(image_tensor(example.image))[0]})
            for module in encoders:
                module.to("cpu")

    @staticmethod
    def fit_captions(family: ModelFamily, examples, method: str, warn: bool = True) -> dict[str, str]:
        """Every caption -> the text that is encoded: the caption itself, or its start where the text encoder would not
        read it whole (family.fit_caption; stock inference cuts it at the same place), with one warning per image.
        The cache keys stay the captions themselves."""
        fitted = {}
        for example in examples:
            for caption in example.captions:
                if caption in fitted:
                    continue
                fitted[caption] = family.fit_caption(caption, teacher=method == "dopsd")
                if not fitted[caption]:
                    raise UserError(f"{example.name}: the teacher's prompt suffix alone is longer than the "
                                    f"{family.max_sequence_length} tokens the text encoder reads: shorten --teacher_prompt_suffix.")
                if warn and fitted[caption] != caption:
                    logger.warning("%s: its caption is longer than the %d tokens %s's text encoder reads; training on the "
                                   "first %d of its %d characters (the stock pipeline cuts long prompts there too).",
                                   example.name, family.max_sequence_length, family.display_name, len(fitted[caption]), len(caption))
        return fitted

    def index(self, examples, method, rows=()):
        """Name every entry this run needs; returns (kind, key, prompt, example) for each. `rows` are the validation
        examples, one caption each. An edit's conditions are keyed by its sources too: one instruction given with two
        sources is two conditions."""
        todo = []
        for example in [*examples, *rows]:
            for prompt in example.captions:
                key = self.keys[("student", prompt, example.source_digest)] = self._key("student", prompt, *_source_part(example))
                todo.append(("student", key, prompt, example))
        for i, example in enumerate(examples):
            if method == "dopsd":
                for caption in example.captions:
                    key = self.keys[("teacher", i, caption)] = self._key("teacher", caption, example.digest, *_source_part(example))
                    todo.append(("teacher", key, caption, example))
            else:
                key = self.keys[("latents", i)] = self._key("latents", example.digest)
                todo.append(("latents", key, None, example))
        for i, row in enumerate(rows if method == "dopsd" else ()):
            key = self.keys[("teacher-row", i)] = self._key("teacher", row.captions[0], row.digest, *_source_part(row))
            todo.append(("teacher", key, row.captions[0], row))
        # An entry shared by two uses is computed once; the order is the same on every rank, which splits the work by it.
        return sorted({entry[1]: entry for entry in todo}.values(), key=lambda entry: entry[1])
