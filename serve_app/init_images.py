"""Init images and masks checked at the gateway, before a request is keyed or queued.

The protocol checks bytes (a size cap and a PNG/JPEG/WebP signature). Here the header is read
for the pixel count before a single pixel is decoded (decompression bombs), then the image is
decoded whole, so a truncated or corrupt file is refused with the field's name rather than
failing on a worker. Runs on a pool thread: decoding a few megabytes takes milliseconds.
"""

from __future__ import annotations

import io
import warnings
from typing import Tuple

from PIL import Image

from client import protocol
from client.protocol import GenerationRequest, InvalidRequest

FORMATS = {"PNG", "JPEG", "WEBP"}


def image_size(name: str, data: bytes) -> Tuple[int, int]:
    """(width, height) of a whole, decodable PNG, JPEG or WebP of at most MAX_IMAGE_PIXELS pixels."""
    protocol.check_image_bytes(name, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=sorted(FORMATS)) as image:
                width, height = image.size  # from the header: nothing decoded yet
                if width * height > protocol.MAX_IMAGE_PIXELS:
                    raise InvalidRequest(name, f"is {width}x{height} pixels; the limit is "
                                         f"{protocol.MAX_IMAGE_PIXELS} pixels ({protocol.MAX_SIDE}x{protocol.MAX_SIDE})")
                image.load()
        except InvalidRequest:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InvalidRequest(name, "declares more pixels than sdgate decodes (a decompression bomb?)") from None
        except (OSError, SyntaxError, ValueError) as exc:  # Pillow's errors for truncated or corrupt files
            raise InvalidRequest(name, f"could not be decoded ({exc}); send a whole PNG, JPEG or WebP file") from None
    return width, height


def check_images(request: GenerationRequest) -> Tuple[int, int]:
    """The init image's size, once it and the mask (same size) are whole images within the caps."""
    size = image_size("init_image", request.init_image)
    if request.mask is not None:
        mask_size = image_size("mask", request.mask)
        if mask_size != size:
            raise InvalidRequest("mask", f"is {mask_size[0]}x{mask_size[1]} but the init image is {size[0]}x{size[1]}; "
                                 "send a mask of the image's size")
    return size


def fitted_size(size: Tuple[int, int], max_side: int) -> Tuple[int, int]:
    """An output size for an init image sent without one: its own, scaled down to fit `max_side`
    and rounded down to multiples of 8 (what the model's latents need)."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return (max(protocol.MIN_SIDE, int(width * scale) // 8 * 8), max(protocol.MIN_SIDE, int(height * scale) // 8 * 8))
