"""Reading image files: size checked from the header before decoding (docs/design.md 4.5).

Every image mcn-compress reads (calibration folders, image-folder datasets) goes through
`read_image`: an image of more than `MAX_IMAGE_PIXELS` pixels (a "decompression bomb": a few
KB of PNG that decode to gigabytes) is refused from its header, before its pixels are decoded,
and a file that is not an image, or is cut or corrupt, is one `DataError` naming it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from mcn_compress.errors import DataError, first_line

MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Most pixels of one image (8192 x 8192; 192 MiB as RGB). Camera photos have at most a few
tens of millions; Pillow's own warning starts at 89 million and its error at 179 million."""


def read_image(path: str | Path, mode: str) -> Any:
    """The image at ``path`` decoded and converted to ``mode`` (``"L"`` or ``"RGB"``), as a
    loaded PIL image; `DataError` naming the file for a bomb, a non-image or a damaged one."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise DataError(_too_large(path, width, height))
                return image.convert(mode)
    except Image.DecompressionBombError as exc:  # Pillow's own check, at twice its limit
        raise DataError(
            f"cannot read image {path}: {first_line(exc)} (mcn-compress decodes images of up to "
            f"{MAX_IMAGE_PIXELS:,} pixels)"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's ways of saying "bad file"
        raise DataError(f"cannot read image {path}: {first_line(exc)}") from exc


def _too_large(path: str | Path, width: int, height: int) -> str:
    return (
        f"cannot read image {path}: it is {width} x {height} = {width * height:,} pixels, more "
        f"than the {MAX_IMAGE_PIXELS:,} mcn-compress decodes (a decompression bomb?); "
        "resize it or leave it out"
    )


class ImageLoader:
    """`read_image` as a loader for torchvision's `ImageFolder` (picklable for workers)."""

    def __init__(self, mode: str = "RGB") -> None:
        self.mode = mode

    def __call__(self, path: str) -> Any:
        return read_image(path, self.mode)
