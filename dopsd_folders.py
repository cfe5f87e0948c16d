# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""What counts as a training image in a folder, for the trainer and the captioner alike (standard library only, so
the captioner can report a bad folder before torch loads)."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def is_image_name(path: Path) -> bool:
    """An image by its name; hidden files are not (macOS writes ._name.jpg beside every copied photo)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def no_images_message(root: Path) -> str:
    """The error for a folder without images, pointing at images in its sub-folders, which are not read."""
    message = f"--instance_data_dir {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    nested = next((p for p in sorted(root.rglob("*")) if is_image_name(p) and p.is_file()), None)
    if nested is None:
        return message + "."
    return (f"{message} at its top level; sub-folders are not read (e.g. {nested.relative_to(root)}): move the images "
            "up, or list them in a metadata.jsonl with file_name paths relative to the folder.")
