"""Conversion of a tiny synthetic TF.js layers model, checked against a NumPy reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sortline_spark.convert import CAFFE, EMBEDDING, PROBABILITIES, keras_to_onnx
from sortline_spark.tfjs import ModelFormatError, load_layers_model


def _layer(name, class_name, config, inbound):
    config = {"name": name, **config}
    nodes = [[[source, 0, 0, {}] for source in inbound]] if inbound else []
    return {"name": name, "class_name": class_name, "config": config, "inbound_nodes": nodes}


def _write_model(folder: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Write a residual network that uses every layer type ResNet-50 needs, split over two shards."""
    layers = [
        _layer("input_1", "InputLayer", {"batch_input_shape": [None, 12, 12, 3], "dtype": "float32"}, []),
        _layer("pad", "ZeroPadding2D", {"padding": [[1, 1], [1, 1]], "data_format": "channels_last"}, ["input_1"]),
        _layer("conv_a", "Conv2D", {"filters": 4, "kernel_size": [3, 3], "strides": [2, 2], "padding": "valid",
                                    "activation": "linear", "use_bias": True, "dilation_rate": [1, 1]}, ["pad"]),
        _layer("bn_a", "BatchNormalization", {"axis": [3], "epsilon": 1e-3}, ["conv_a"]),
        _layer("relu_a", "Activation", {"activation": "relu"}, ["bn_a"]),
        _layer("conv_b", "Conv2D", {"filters": 4, "kernel_size": [3, 3], "strides": [1, 1], "padding": "same",
                                    "activation": "relu", "use_bias": True}, ["relu_a"]),
        _layer("add", "Add", {}, ["conv_b", "relu_a"]),
        _layer("pool_pad", "ZeroPadding2D", {"padding": [[1, 1], [1, 1]]}, ["add"]),
        _layer("pool", "MaxPooling2D", {"pool_size": [3, 3], "strides": [2, 2], "padding": "valid"}, ["pool_pad"]),
        _layer("gap", "GlobalAveragePooling2D", {}, ["pool"]),
        _layer("dense", "Dense", {"units": 5, "activation": "softmax", "use_bias": True}, ["gap"]),
    ]
    weights = {
        "conv_a/kernel": rng.normal(size=(3, 3, 3, 4)).astype(np.float32) * 0.05,
        "conv_a/bias": rng.normal(size=4).astype(np.float32),
        "bn_a/gamma": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "bn_a/beta": rng.normal(size=4).astype(np.float32),
        "bn_a/moving_mean": rng.normal(size=4).astype(np.float32),
        "bn_a/moving_variance": rng.uniform(0.5, 2.0, 4).astype(np.float32),
        "conv_b/kernel": rng.normal(size=(3, 3, 4, 4)).astype(np.float32) * 0.3,
        "conv_b/bias": rng.normal(size=4).astype(np.float32),
        "dense/kernel": rng.normal(size=(4, 5)).astype(np.float32),
        "dense/bias": rng.normal(size=5).astype(np.float32),
    }
    blob = b"".join(w.tobytes() for w in weights.values())
    half = len(blob) // 2
    (folder / "group1-shard1of2.bin").write_bytes(blob[:half])
    (folder / "group1-shard2of2.bin").write_bytes(blob[half:])
    document = {
        "format": "layers-model",
        "modelTopology": {"model_config": {"class_name": "Model", "config": {
            "layers": layers, "input_layers": [["input_1", 0, 0]], "output_layers": [["dense", 0, 0]]}}},
        "weightsManifest": [{"paths": ["group1-shard1of2.bin", "group1-shard2of2.bin"],
                             "weights": [{"name": k, "shape": list(v.shape), "dtype": "float32"} for k, v in weights.items()]}],
    }
    (folder / "model.json").write_text(json.dumps(document))
    return weights


def _conv_nhwc(x, kernel, bias, stride, pad):
    """Plain NumPy convolution, channels last, explicit (top, bottom, left, right) zero padding."""
    top, bottom, left, right = pad
    x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw, _, out = kernel.shape
    rows = (x.shape[1] - kh) // stride + 1
    cols = (x.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], rows, cols, out), np.float64)
    for i in range(rows):
        for j in range(cols):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            y[:, i, j, :] = np.tensordot(patch, kernel, axes=([1, 2, 3], [0, 1, 2]))
    return y + bias


def _reference(pixels: np.ndarray, w: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Keras semantics: RGB->BGR, mean subtraction, channels-last layers."""
    x = pixels.astype(np.float64)[..., ::-1] - np.array(CAFFE.mean[::-1])
    x = _conv_nhwc(x, w["conv_a/kernel"], w["conv_a/bias"], 2, (1, 1, 1, 1))
    x = w["bn_a/gamma"] * (x - w["bn_a/moving_mean"]) / np.sqrt(w["bn_a/moving_variance"] + 1e-3) + w["bn_a/beta"]
    a = np.maximum(x, 0)
    b = np.maximum(_conv_nhwc(a, w["conv_b/kernel"], w["conv_b/bias"], 1, (1, 1, 1, 1)), 0)
    x = np.pad(a + b, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = (x.shape[1] - 3) // 2 + 1
    pooled = np.stack([np.stack([x[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :].max(axis=(1, 2)) for j in range(rows)], 1)
                       for i in range(rows)], 1)
    embedding = pooled.mean(axis=(1, 2))
    logits = embedding @ w["dense/kernel"] + w["dense/bias"]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True), embedding


def test_tiny_model_matches_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    weights = _write_model(tmp_path, rng)
    model = keras_to_onnx(load_layers_model(tmp_path / "model.json"), CAFFE)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = rng.integers(0, 256, size=(2, 12, 12, 3), dtype=np.uint8)

    probabilities, embedding = session.run([PROBABILITIES, EMBEDDING], {"pixels": pixels})
    expected_probabilities, expected_embedding = _reference(pixels, weights)

    np.testing.assert_allclose(embedding, expected_embedding, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(probabilities, expected_probabilities, rtol=1e-4, atol=1e-5)


def test_batch_norm_folded_into_conv(tmp_path: Path) -> None:
    _write_model(tmp_path, np.random.default_rng(1))
    model = keras_to_onnx(load_layers_model(tmp_path / "model.json"), CAFFE)
    ops = [node.op_type for node in model.graph.node]
    assert "BatchNormalization" not in ops
    assert "Pad" not in ops


def test_shard_size_mismatch_rejected(tmp_path: Path) -> None:
    _write_model(tmp_path, np.random.default_rng(2))
    shard = tmp_path / "group1-shard2of2.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ModelFormatError, match="bytes"):
        load_layers_model(tmp_path / "model.json")


def test_unsupported_layer_rejected(tmp_path: Path) -> None:
    _write_model(tmp_path, np.random.default_rng(3))
    document = json.loads((tmp_path / "model.json").read_text())
    document["modelTopology"]["model_config"]["config"]["layers"][4]["class_name"] = "LSTM"
    (tmp_path / "model.json").write_text(json.dumps(document))
    with pytest.raises(ModelFormatError, match="LSTM"):
        keras_to_onnx(load_layers_model(tmp_path / "model.json"), CAFFE)
