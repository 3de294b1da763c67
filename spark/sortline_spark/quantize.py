"""INT8 static quantization with onnxruntime (QDQ format, per-channel weights)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from .convert import PIXELS

log = logging.getLogger(__name__)


class _PixelReader(CalibrationDataReader):
    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {PIXELS: batch}


def float_only_nodes(model: onnx.ModelProto) -> list[str]:
    """Return the nodes kept in float: input preprocessing and the small classification head.

    Preprocessing works on raw pixel values, and the head has a few thousand weights whose
    quantization saves nothing but can cost accuracy on small classes.
    """
    return [node.name for node in model.graph.node if node.name.startswith(("preprocess/", "head/"))]


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: list[np.ndarray], batch_size: int = 8) -> dict:
    """Quantize a composed model to INT8, calibrated on ``calibration`` images.

    Parameters
    ----------
    fp32_path, int8_path
        Source float model and destination.
    calibration
        Model inputs (uint8 HxWx3 RGB) from the training split, never the validation split.

    Returns
    -------
    dict
        The settings written into the manifest.
    """
    if not calibration:
        raise ValueError("INT8 calibration needs at least one image")
    model = onnx.load(str(fp32_path))
    excluded = float_only_nodes(model)
    batches = [np.stack(calibration[i:i + batch_size]) for i in range(0, len(calibration), batch_size)]
    settings = {
        "format": "QDQ",
        "weights": "int8 with 7-bit range (reduce_range), symmetric, per output channel",
        "activations": "uint8, asymmetric, per tensor",
        "calibration": {"method": "minmax", "images": len(calibration), "split": "train"},
        "floatNodes": "input preprocessing and classification head",
    }
    log.info("quantizing to INT8 with %d calibration images", len(calibration))
    quantize_static(
        str(fp32_path),
        str(int8_path),
        _PixelReader(batches),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        # x86 CPUs without VNNI multiply u8 x s8 with VPMADDUBSW, whose 16-bit sums saturate with
        # full-range weights: on AVX2 that cost this model 8 points of accuracy. 7-bit weights avoid it.
        reduce_range=True,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=excluded,
        calibration_providers=["CPUExecutionProvider"],
    )
    return settings
