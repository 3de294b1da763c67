"""Head training on synthetic features and its composition into a small ONNX backbone graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sortline_spark.convert import EMBEDDING, PIXELS, PROBABILITIES
from sortline_spark.head import Head, HeadConfig, compose, train_head

LABELS = ["glass", "metal", "paper"]
SMALL_HEAD = HeadConfig(hidden=16, epochs=30, batch_size=16)


def _blobs(rng: np.random.Generator, per_class: int, dims: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Return features of three well separated Gaussian clusters and their class indices."""
    centres = np.eye(len(LABELS), dims) * 6.0 + 3.0
    targets = np.repeat(np.arange(len(LABELS)), per_class)
    features = centres[targets] + rng.normal(size=(len(targets), dims))
    return features.astype(np.float32), targets


def _fake_backbone(rng: np.random.Generator, side: int = 4) -> onnx.ModelProto:
    """Build a graph shaped like the backbone: uint8 NHWC ``pixels`` to ``probabilities``, ``embedding`` and ``stage4``."""
    flat = side * side * 3
    initializers = [
        numpy_helper.from_array(np.array([-1, flat], np.int64), "flat_shape"),
        numpy_helper.from_array(rng.normal(size=(flat, 8)).astype(np.float32) * 0.01, "embedding_weight"),
        numpy_helper.from_array(rng.normal(size=(flat, 6)).astype(np.float32) * 0.01, "stage4_weight"),
        numpy_helper.from_array(rng.normal(size=(8, 1000)).astype(np.float32), "imagenet/weight"),
        numpy_helper.from_array(np.zeros(1000, np.float32), "imagenet/bias"),
    ]
    nodes = [
        helper.make_node("Cast", [PIXELS], ["pixels_float"], name="preprocess/cast", to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["pixels_float", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "embedding_weight"], [EMBEDDING], name="embedding"),
        helper.make_node("MatMul", ["flat", "stage4_weight"], ["stage4"], name="stage4"),
        helper.make_node("Gemm", [EMBEDDING, "imagenet/weight", "imagenet/bias"], ["imagenet/logits"], name="imagenet/dense"),
        helper.make_node("Softmax", ["imagenet/logits"], [PROBABILITIES], name="imagenet/softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "fake-backbone",
        [helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, ["batch", side, side, 3])],
        [
            helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", 1000]),
            helper.make_tensor_value_info(EMBEDDING, TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("stage4", TensorProto.FLOAT, ["batch", 6]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _accuracy(head: Head, features: np.ndarray, targets: np.ndarray) -> float:
    return float((head.predict_proba(features).argmax(axis=1) == targets).mean())


@pytest.mark.parametrize("hidden", [16, 0], ids=["mlp", "logistic"])
def test_train_head_separable_problem(hidden: int) -> None:
    rng = np.random.default_rng(3)
    features, targets = _blobs(rng, per_class=30)
    held_out, held_out_targets = _blobs(rng, per_class=30)

    # 90 examples give 6 steps per epoch, so the default rate of 1e-3 leaves the head under-trained.
    config = HeadConfig(hidden=hidden, epochs=60, batch_size=16, learning_rate=1e-2)

    head = train_head(features, targets, LABELS, config)

    assert len(head.layers) == (2 if hidden else 1)
    assert _accuracy(head, features, targets) == 1.0
    assert _accuracy(head, held_out, held_out_targets) >= 0.95


def test_train_head_probabilities_sum_to_one() -> None:
    features, targets = _blobs(np.random.default_rng(4), per_class=10)

    probabilities = train_head(features, targets, LABELS, SMALL_HEAD).predict_proba(features)

    assert probabilities.shape == (30, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_train_head_deterministic() -> None:
    features, targets = _blobs(np.random.default_rng(5), per_class=10)

    first = train_head(features, targets, LABELS, SMALL_HEAD)
    second = train_head(features, targets, LABELS, SMALL_HEAD)

    for (w1, b1), (w2, b2) in zip(first.layers, second.layers):
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_array_equal(b1, b2)


def test_train_head_one_class_rejected() -> None:
    features = np.zeros((4, 3), np.float32)

    with pytest.raises(ValueError, match="at least two classes"):
        train_head(features, np.zeros(4, np.int64), ["glass"], SMALL_HEAD)


def test_train_head_empty_class_rejected() -> None:
    features, targets = _blobs(np.random.default_rng(6), per_class=5)
    without_paper = targets != 2

    with pytest.raises(ValueError, match=r"classes without training images: \['paper'\]"):
        train_head(features[without_paper], targets[without_paper], LABELS, SMALL_HEAD)


@pytest.mark.parametrize("hidden", [16, 0], ids=["mlp", "logistic"])
def test_compose_matches_predict_proba(hidden: int) -> None:
    rng = np.random.default_rng(7)
    backbone = _fake_backbone(rng)
    pixels = rng.integers(0, 256, size=(24, 4, 4, 3), dtype=np.uint8)
    original = ort.InferenceSession(backbone.SerializeToString(), providers=["CPUExecutionProvider"])
    stage4, embedding = original.run(["stage4", EMBEDDING], {PIXELS: pixels})
    features = np.concatenate([stage4, embedding], axis=1)
    head = train_head(features, np.arange(24) % 3, LABELS, HeadConfig(hidden=hidden, epochs=5, batch_size=8))

    composed = compose(backbone, head, ("stage4", EMBEDDING))
    session = ort.InferenceSession(composed.SerializeToString(), providers=["CPUExecutionProvider"])
    probabilities, composed_embedding = session.run([PROBABILITIES, EMBEDDING], {PIXELS: pixels})

    assert [output.name for output in composed.graph.output] == [PROBABILITIES, EMBEDDING]
    assert probabilities.shape == (24, 3)
    np.testing.assert_allclose(probabilities, head.predict_proba(features), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(composed_embedding, embedding)


def test_compose_drops_imagenet_classifier() -> None:
    rng = np.random.default_rng(8)
    backbone = _fake_backbone(rng)
    features = rng.normal(size=(6, 14)).astype(np.float32)
    head = train_head(features, np.arange(6) % 3, LABELS, HeadConfig(hidden=4, epochs=1))

    composed = compose(backbone, head, ("stage4", EMBEDDING))

    node_names = {node.name for node in composed.graph.node}
    initializer_names = {init.name for init in composed.graph.initializer}
    assert not any(name.startswith("imagenet/") for name in node_names | initializer_names)
    assert {"preprocess/cast", "flatten", "embedding", "stage4", "head/concat", "head/softmax"} <= node_names
