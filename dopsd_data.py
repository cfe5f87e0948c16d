# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""What the model is trained on: images and captions from a folder or a dataset, checked before any model loads,
cropped into aspect-ratio buckets and batched one bucket at a time; and their conditions, computed once and cached."""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from dopsd_args import UserError
from pipeline_dopsd import ModelFamily

logger = logging.getLogger("dopsd")

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# The caption of a row when no --caption_column is given: the first of these it has.
DEFAULT_CAPTION_KEYS = ("text", "caption", "prompt")


@dataclass
class Example:
    """One training image, already cropped to its bucket, with its candidate captions (one per caption column).

    `image` is dropped once its conditions are cached (thousands of images need not stay in memory); `size` and
    `digest` (a hash of the pixels, for the condition cache) remain.
    """

    name: str
    image: Image.Image | None
    captions: list[str]
    size: tuple[int, int] = (0, 0)
    digest: str = ""

    def __post_init__(self):
        if self.image is not None:
            import hashlib

            self.size = self.image.size
            self.digest = hashlib.sha256(self.image.tobytes()).hexdigest()


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


def _caption_columns(args) -> list[str] | None:
    return [c.strip() for c in args.caption_column.split(",") if c.strip()] if args.caption_column else None


def _row_captions(row: dict, columns, where: str) -> tuple[list[str], list[str]]:
    """(captions, missing columns) of one metadata or dataset row. With --caption_column every listed column the row
    has counts (a row lacking some uses its others); without it, the first of text, caption, prompt. A null value
    counts as absent."""
    keys = columns or [k for k in DEFAULT_CAPTION_KEYS if row.get(k) is not None][:1]
    present = [k for k in keys if row.get(k) is not None]
    captions = [_caption(row[k], f"{where}: '{k}'", f"write a caption or remove '{k}'") for k in present]
    return captions, [k for k in keys if k not in present]


def collect_raw_examples(args):
    """(name, path or PIL image, captions) for every training image, checked before any model is loaded
    (a dataset's rows are checked as they are read, still before any model is loaded)."""
    columns = _caption_columns(args)
    if args.instance_data_dir is not None:
        return _folder_examples(Path(args.instance_data_dir), columns, args.instance_prompt)
    return _dataset_examples(args, columns)


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


def row_file(root: Path, row: dict, where: str) -> Path:
    """The resolved path a metadata row's 'file_name' names: a path relative to the data folder that stays inside it."""
    if "file_name" not in row:
        raise UserError(f"{where} has no 'file_name': add the image path relative to {root}.")
    name = row["file_name"]
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise UserError(f"{where}: 'file_name' must be the image's path relative to {root}, got {name!r}.")
    if Path(name).is_absolute():
        raise UserError(f"{where}: path {name!r} points outside the dataset folder: use a path relative to {root}.")
    return _contained(root, root / name, f"{where}: 'file_name'")


def _metadata_rows(root: Path, metadata: Path) -> list[tuple[str, dict, Path]]:
    """(where, row, image) for every row of metadata.jsonl, each row checked: one JSON object per line whose
    'file_name' is a path relative to the folder naming an image file inside it, listed once."""
    text = _read_text(_contained(root, metadata, "metadata file"), "metadata file")
    rows, seen = [], {}
    for index, where, row in json_lines(text, metadata, example='{"file_name": "01.jpg", "text": "..."}'):
        image, name = row_file(root, row, where), row["file_name"]
        if image.is_dir():
            raise UserError(f"{where}: 'file_name' {name!r} is a folder: name an image file.")
        if not image.exists():
            raise UserError(f"{where}: 'file_name' {name!r} does not exist in {root}: fix the path or delete the line.")
        if image in seen:
            raise UserError(f"{where} lists {name!r} again (first at line {seen[image]}): merge the two rows.")
        seen[image] = index + 1
        rows.append((where, row, image))
    if not rows:
        raise UserError(f"{metadata} is empty: add one {{\"file_name\": ..., \"text\": ...}} line per image, or delete it to "
                        "use .txt captions and --instance_prompt.")
    return rows


def _folder_examples(root: Path, columns, instance_prompt):
    if not root.is_dir():
        raise UserError(f"--instance_data_dir {root} does not exist or is not a folder.")
    metadata = root / "metadata.jsonl"
    rows = []
    if metadata.exists() or metadata.is_symlink():
        entries = _metadata_rows(root, metadata)
        fields = {key for _, row, _ in entries for key in row}
        if columns and (unknown := [c for c in columns if c not in fields]):
            raise UserError(f"--caption_column {','.join(unknown)} matches no field of {metadata} (fields: "
                            f"{', '.join(sorted(fields))}): fix the name.")
        partial = 0
        for where, row, path in entries:
            captions, missing = _row_captions(row, columns, where)
            partial += bool(captions and missing)
            rows.append((str(path), path, captions or ([instance_prompt] if instance_prompt else [])))
        if partial:
            logger.warning("%d rows of %s lack some of --caption_column %s: they train on their other listed captions.",
                           partial, metadata, ",".join(columns))
    else:
        try:
            listing = sorted(root.iterdir())
        except OSError as error:
            raise UserError(f"cannot list --instance_data_dir {root} ({error.strerror}): fix its permissions.") from None
        for path in listing:
            # Hidden files are not training images (macOS writes ._name.jpg beside every copied photo).
            if path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
                continue
            image = _contained(root, path, "image")
            if image.is_dir():
                continue
            if not image.exists():
                raise UserError(f"image {path} is a link to a missing file: fix the link or remove it.")
            caption_file = path.with_suffix(".txt")
            has_caption = caption_file.exists() or caption_file.is_symlink()
            captions = [_read_caption(root, caption_file)] if has_caption else ([instance_prompt] if instance_prompt else [])
            rows.append((str(path), path, captions))
    if not rows:
        raise UserError(f"--instance_data_dir {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    for name, _, captions in rows:
        if not captions:
            raise UserError(f"{name} has no caption: add a same-stem .txt file, a metadata.jsonl entry or --instance_prompt.")
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
    return _dataset_rows(args, dataset, columns)


def _dataset_rows(args, dataset, columns):
    """Rows one at a time, so that a streamed dataset is never held whole in memory."""
    for i, row in enumerate(dataset):
        captions, _ = _row_captions(row, columns, f"row {i} of {args.dataset_name}")
        captions = captions or ([args.instance_prompt] if args.instance_prompt else [])
        if not captions:
            raise UserError(f"row {i} of {args.dataset_name} has no caption: pass --caption_column or --instance_prompt.")
        yield f"{args.dataset_name}[{i}]", row[args.image_column], captions


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
    """Open, check and bucket-crop every image (before heavy models are loaded, so a bad file fails fast)."""
    buckets = make_buckets(args)
    examples = []
    for name, source, captions in raw:
        try:
            image = open_image(source, name)
        except UserError:
            if not args.skip_bad_images:
                raise
            logger.warning("skipping unreadable image %s", name)
            continue
        if reason := family.check_reference_image(*image.size):
            raise UserError(f"{name}: {reason}; resize or remove it.")
        cropped = crop_to_bucket(image, buckets)
        if reason := family.check_reference_image(*cropped.size):
            raise UserError(f"{name} goes to a {cropped.size[0]}x{cropped.size[1]} bucket at --resolution {args.resolution}: {reason}; raise --resolution.")
        examples.append(Example(name, cropped, captions))
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
            groups.setdefault(example.size, []).append(i)
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
        import hashlib

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

    def student(self, prompt: str) -> dict[str, torch.Tensor]:
        return self._get(self.keys[("student", prompt)])

    def teacher(self, index: int, caption: str) -> dict[str, torch.Tensor]:
        return self._get(self.keys[("teacher", index, caption)])

    def latents(self, index: int) -> torch.Tensor:
        return self._get(self.keys[("latents", index)])["latents"]

    def teacher_row(self, prompt: str) -> dict[str, torch.Tensor]:
        return self._get(self.keys[("teacher-row", prompt)])

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
                if kind == "student":
                    self._put(key, family.encode_student([fitted[prompt]])[0])
                elif kind == "teacher":
                    try:
                        condition = family.encode_teacher([fitted[prompt]], [example.image])[0]
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
        (prompt, reference image) pairs, given as examples with one caption."""
        todo = []
        for prompt in sorted({c for e in [*examples, *rows] for c in e.captions}):
            key = self.keys[("student", prompt)] = self._key("student", prompt)
            todo.append(("student", key, prompt, None))
        for i, example in enumerate(examples):
            if method == "dopsd":
                for caption in example.captions:
                    key = self.keys[("teacher", i, caption)] = self._key("teacher", caption, example.digest)
                    todo.append(("teacher", key, caption, example))
            else:
                key = self.keys[("latents", i)] = self._key("latents", example.digest)
                todo.append(("latents", key, None, example))
        for row in rows if method == "dopsd" else ():
            key = self.keys[("teacher-row", row.captions[0])] = self._key("teacher", row.captions[0], row.digest)
            todo.append(("teacher", key, row.captions[0], row))
        return list({entry[1]: entry for entry in todo}.values())  # an entry shared by two uses is computed once
