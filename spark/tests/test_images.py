"""Decoding and the resize/crop policy on real photos and on inputs written with libvips."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import pyvips

from sortline_spark.images import ImageDecodeError, ResizePolicy, prepare, scaled_size

from conftest import DEMO_PHOTOS


def _mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def _png_header_only(width: int, height: int) -> bytes:
    """Return a greyscale PNG whose header declares ``width`` x ``height`` but whose data contains one row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photo(photo_bytes: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(photo_bytes, "")


@pytest.fixture(scope="module")
def reference(photo_bytes: bytes) -> np.ndarray:
    """Return the model input of the unmodified photo, whose short side is already 256 px."""
    return prepare(photo_bytes)


@pytest.mark.parametrize("path", sorted(DEMO_PHOTOS.glob("*/*.jpg"))[::6], ids=lambda p: p.name)
def test_prepare_real_photo_shape(path: Path) -> None:
    pixels = prepare(path.read_bytes())

    assert pixels.shape == (224, 224, 3)
    assert pixels.dtype == np.uint8


def test_prepare_crops_centre_without_scaling(photo: pyvips.Image, reference: np.ndarray) -> None:
    assert (photo.width, photo.height) == (256, 341)
    full = np.ndarray(buffer=photo.write_to_memory(), dtype=np.uint8, shape=(photo.height, photo.width, 3))
    left, top = (256 - 224) // 2, (341 - 224) // 2

    np.testing.assert_array_equal(reference, full[top:top + 224, left:left + 224])


def test_prepare_downscales_larger_image(photo: pyvips.Image, reference: np.ndarray) -> None:
    enlarged = photo.resize(480 / photo.width).jpegsave_buffer(Q=95)
    assert pyvips.Image.new_from_buffer(enlarged, "").width == 480

    pixels = prepare(enlarged)

    # Upscaling then downscaling with Lanczos-3 and a JPEG round trip stay close to the original.
    assert pixels.shape == (224, 224, 3)
    assert _mean_abs_difference(pixels, reference) < 4.0


def test_prepare_landscape_image(photo: pyvips.Image) -> None:
    landscape = photo.rot90().resize(640 / photo.height).jpegsave_buffer(Q=95)
    full = np.ndarray(buffer=photo.write_to_memory(), dtype=np.uint8, shape=(photo.height, photo.width, 3))

    pixels = prepare(landscape)

    # The 341 px side leaves 117 px around the crop: 58 before it in the landscape frame,
    # which is 59 from the top of the portrait photo once rotated back.
    assert pixels.shape == (224, 224, 3)
    assert _mean_abs_difference(np.rot90(pixels, k=1), full[59:59 + 224, 16:16 + 224]) < 4.0


def test_prepare_applies_exif_orientation(photo: pyvips.Image, reference: np.ndarray) -> None:
    # Orientation 6 means "rotate 90 degrees clockwise to display", so the stored pixels are
    # the photo rotated 90 degrees counter-clockwise.
    stored = photo.rot270().copy()
    stored.set_type(pyvips.GValue.gint_type, "orientation", 6)
    tagged = stored.jpegsave_buffer(Q=95)
    untagged = photo.rot270().jpegsave_buffer(Q=95)

    assert _mean_abs_difference(prepare(tagged), reference) < 2.0
    assert _mean_abs_difference(prepare(untagged), reference) > 20.0


def test_prepare_greyscale_gives_three_equal_channels(photo: pyvips.Image) -> None:
    grey = photo.colourspace("b-w").jpegsave_buffer()
    assert pyvips.Image.new_from_buffer(grey, "").bands == 1

    pixels = prepare(grey)

    assert pixels.shape == (224, 224, 3)
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])


def test_prepare_flattens_alpha_onto_white(photo: pyvips.Image, reference: np.ndarray) -> None:
    # Left half fully transparent, right half opaque.
    opaque = (pyvips.Image.xyz(photo.width, photo.height)[0] >= photo.width // 2).ifthenelse(255, 0).cast("uchar")
    rgba = photo.bandjoin(opaque).copy(interpretation="srgb").pngsave_buffer()
    assert pyvips.Image.new_from_buffer(rgba, "").bands == 4

    pixels = prepare(rgba)

    # The crop starts 16 px into the 256 px image, so crop column 112 is the edge at x = 128.
    assert (pixels[:, :112] == 255).all()
    np.testing.assert_array_equal(pixels[:, 112:], reference[:, 112:])


def test_prepare_custom_background(photo: pyvips.Image) -> None:
    transparent = photo.bandjoin(0).copy(interpretation="srgb").pngsave_buffer()

    pixels = prepare(transparent, ResizePolicy(background=(10, 20, 30)))

    assert (pixels == np.array([10, 20, 30], np.uint8)).all()


def test_prepare_16bit_png(photo: pyvips.Image, reference: np.ndarray) -> None:
    sixteen = photo.colourspace("rgb16").pngsave_buffer()
    assert pyvips.Image.new_from_buffer(sixteen, "").format == "ushort"

    pixels = prepare(sixteen)

    assert pixels.dtype == np.uint8
    assert _mean_abs_difference(pixels, reference) < 1.0


def test_prepare_cmyk_jpeg(photo: pyvips.Image, reference: np.ndarray) -> None:
    try:
        cmyk = photo.icc_transform("cmyk").jpegsave_buffer(Q=95)
    except pyvips.Error as error:
        pytest.skip(f"this libvips cannot write CMYK: {error}")
    assert pyvips.Image.new_from_buffer(cmyk, "").interpretation == "cmyk"

    pixels = prepare(cmyk)

    # The sRGB -> CMYK -> sRGB round trip through ICC profiles moves colours a few levels.
    assert pixels.shape == (224, 224, 3)
    assert _mean_abs_difference(pixels, reference) < 12.0


def test_prepare_upscales_small_image(photo: pyvips.Image) -> None:
    small = photo.resize(0.25).jpegsave_buffer()

    pixels = prepare(small)

    assert pixels.shape == (224, 224, 3)


def test_truncated_jpeg_rejected(photo_bytes: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        prepare(photo_bytes[: len(photo_bytes) // 2])


@pytest.mark.parametrize("data", [b"", np.random.default_rng(0).bytes(5000)], ids=["empty", "random"])
def test_non_image_bytes_rejected(data: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        prepare(data)


def test_image_smaller_than_crop_rejected(photo_bytes: bytes) -> None:
    # With the default policy every image is scaled to a 256 px short side, so only a policy
    # whose short side is below the crop leaves an image smaller than the crop.
    with pytest.raises(ImageDecodeError, match="smaller than the 224 px crop"):
        prepare(photo_bytes, ResizePolicy(resize_short_side=200, crop=224))


def test_image_over_pixel_limit_rejected() -> None:
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        prepare(_png_header_only(20_000, 20_000))


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (256, 341, (256, 341)),
        (341, 256, (341, 256)),
        (640, 480, (341, 256)),
        (480, 640, (256, 341)),
        (512, 384, (341, 256)),
        (100, 100, (256, 256)),
        (64, 48, (341, 256)),
        (4000, 3000, (341, 256)),
        (1000, 10, (25600, 256)),
    ],
)
def test_scaled_size(width: int, height: int, expected: tuple[int, int]) -> None:
    assert scaled_size(width, height, 256) == expected


def test_resize_policy_manifest_round_trip() -> None:
    policy = ResizePolicy(resize_short_side=288, crop=256, kernel="cubic", background=(0, 0, 0))

    section = policy.to_manifest()

    assert section["crop"] == {"mode": "centre", "width": 256, "height": 256}
    assert section["resize"] == {"shortSide": 288, "kernel": "cubic"}
    assert ResizePolicy.from_manifest(section) == policy
