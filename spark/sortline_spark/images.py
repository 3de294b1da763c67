"""Image decoding and the resize/crop policy shared with the edge agent.

Both sides use libvips (pyvips here, sharp on the agent) with the same steps, so the pixels the
training job embeds are the pixels the agent feeds the model:

1. decode the first frame or page, apply the EXIF orientation;
2. convert to 8-bit sRGB (greyscale, CMYK, 16-bit inputs) and flatten alpha onto white;
3. scale so that the short side equals ``resize_short_side`` with the Lanczos-3 kernel
   (no scaling when it already does);
4. cut the centre ``crop`` x ``crop`` square, left = floor((w - crop) / 2), top likewise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyvips

# libvips refuses to decode images with more pixels than this, bounding memory per image.
MAX_PIXELS = 100_000_000


class ImageDecodeError(ValueError):
    """An image that cannot be decoded or converted."""


@dataclass(frozen=True)
class ResizePolicy:
    """Resize and crop policy from image to model input (stored in the model manifest)."""

    resize_short_side: int = 256
    crop: int = 224
    kernel: str = "lanczos3"
    background: tuple[int, int, int] = (255, 255, 255)

    def to_manifest(self) -> dict:
        return {
            "orientation": "exif",
            "colourspace": "srgb",
            "alpha": {"flatten": list(self.background)},
            "resize": {"shortSide": self.resize_short_side, "kernel": self.kernel},
            "crop": {"mode": "centre", "width": self.crop, "height": self.crop},
        }

    @staticmethod
    def from_manifest(section: dict) -> "ResizePolicy":
        return ResizePolicy(
            resize_short_side=int(section["resize"]["shortSide"]),
            crop=int(section["crop"]["width"]),
            kernel=str(section["resize"]["kernel"]),
            background=tuple(section["alpha"]["flatten"]),
        )


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Return the size after scaling the short side to ``short_side``, rounded to whole pixels."""
    if min(width, height) == short_side:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def _to_srgb8(image: pyvips.Image, background: tuple[int, int, int]) -> pyvips.Image:
    if image.interpretation not in ("srgb", "b-w") or image.format != "uchar":
        image = image.colourspace("srgb")
    if image.hasalpha():
        image = image.flatten(background=list(background))
    if image.bands == 1:
        image = image.bandjoin([image, image])
    elif image.bands == 2:
        image = image[0].bandjoin([image[0], image[0]])
    elif image.bands > 3:
        image = image.extract_band(0, n=3)
    if image.format != "uchar":
        image = image.cast("uchar")
    return image


def prepare(data: bytes, policy: ResizePolicy = ResizePolicy()) -> np.ndarray:
    """Decode encoded image bytes into the model input: uint8 RGB, shape (crop, crop, 3).

    Raises
    ------
    ImageDecodeError
        If libvips cannot decode the bytes, the image is larger than ``MAX_PIXELS``
        or smaller than the crop after scaling.
    """
    try:
        image = pyvips.Image.new_from_buffer(data, "", access="sequential", fail=True)
        if image.width * image.height > MAX_PIXELS:
            raise ImageDecodeError(f"image of {image.width}x{image.height} pixels exceeds the limit of {MAX_PIXELS}")
        image = image.autorot()
        image = _to_srgb8(image, policy.background)
        width, height = scaled_size(image.width, image.height, policy.resize_short_side)
        if (width, height) != (image.width, image.height):
            image = image.resize(width / image.width, vscale=height / image.height, kernel=policy.kernel)
        if image.width < policy.crop or image.height < policy.crop:
            raise ImageDecodeError(f"image of {image.width}x{image.height} is smaller than the {policy.crop} px crop")
        left = (image.width - policy.crop) // 2
        top = (image.height - policy.crop) // 2
        image = image.crop(left, top, policy.crop, policy.crop)
        pixels = np.frombuffer(image.write_to_memory(), dtype=np.uint8)
    except pyvips.Error as error:
        raise ImageDecodeError(f"cannot decode image: {str(error).strip().splitlines()[0]}") from error
    return pixels.reshape(policy.crop, policy.crop, 3)


def centre_crop_no_resample(data: bytes, size: int = 224) -> np.ndarray:
    """Cut the centre square from an image without scaling (used to check the backbone import)."""
    image = _to_srgb8(pyvips.Image.new_from_buffer(data, "").autorot(), (255, 255, 255))
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    cropped = image.crop(left, top, size, size)
    return np.frombuffer(cropped.write_to_memory(), dtype=np.uint8).reshape(size, size, 3)
