"""Classification head on frozen backbone features, and its composition into the ONNX graph."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .convert import EMBEDDING, PROBABILITIES


@dataclass(frozen=True)
class HeadConfig:
    """Hyper-parameters of the MLP head (``hidden == 0`` gives multinomial logistic regression)."""

    hidden: int = 256
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.5
    input_dropout: float = 0.2
    label_smoothing: float = 0.1
    seed: int = 20261204


@dataclass
class Head:
    """Trained head weights; the feature standardisation is part of the head."""

    labels: list[str]
    mean: np.ndarray
    scale: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = (features - self.mean) * self.scale
        for index, (weight, bias) in enumerate(self.layers):
            x = x @ weight + bias
            if index < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        return x

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(features))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class _Adam:
    def __init__(self, params: list[np.ndarray], learning_rate: float, weight_decay: float) -> None:
        self.params = params
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[np.ndarray], learning_rate: float) -> None:
        self.t += 1
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= beta1
            m += (1 - beta1) * g
            v *= beta2
            v += (1 - beta2) * g * g
            m_hat = m / (1 - beta1 ** self.t)
            v_hat = v / (1 - beta2 ** self.t)
            # Decoupled weight decay (AdamW) on weights only; biases are 1-D.
            if p.ndim > 1:
                p -= learning_rate * self.weight_decay * p
            p -= learning_rate * m_hat / (np.sqrt(v_hat) + eps)


def train_head(features: np.ndarray, targets: np.ndarray, labels: list[str], config: HeadConfig = HeadConfig()) -> Head:
    """Train the head with mini-batch AdamW, dropout and label smoothing, deterministically.

    Parameters
    ----------
    features
        Training features, shape (n, d), float32.
    targets
        Class indices into ``labels``, shape (n,).
    labels
        Class names in output order.

    Raises
    ------
    ValueError
        If there are fewer than two classes or a class has no training example.
    """
    if len(labels) < 2:
        raise ValueError(f"a classifier needs at least two classes, got {labels}")
    counts = np.bincount(targets, minlength=len(labels))
    if (counts == 0).any():
        missing = [labels[i] for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"classes without training images: {missing}")

    rng = np.random.default_rng(config.seed)
    mean = features.mean(axis=0)
    scale = 1.0 / (features.std(axis=0) + 1e-6)
    x_all = ((features - mean) * scale).astype(np.float32)
    n, dims = x_all.shape
    classes = len(labels)
    # Inverse-frequency class weights, so that small classes (trash) count as much as large ones.
    class_weight = (n / (classes * counts)).astype(np.float32)

    sizes = [dims] + ([config.hidden] if config.hidden else []) + [classes]
    layers = [
        (rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out)).astype(np.float32), np.zeros(fan_out, np.float32))
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:])
    ]
    params = [p for layer in layers for p in layer]
    optimiser = _Adam(params, config.learning_rate, config.weight_decay)
    smooth = np.full((classes, classes), config.label_smoothing / classes, np.float32)
    smooth += np.eye(classes, dtype=np.float32) * (1.0 - config.label_smoothing)

    steps_per_epoch = int(np.ceil(n / config.batch_size))
    total_steps = config.epochs * steps_per_epoch
    step = 0
    for _ in range(config.epochs):
        order = rng.permutation(n)
        for start in range(0, n, config.batch_size):
            batch = order[start:start + config.batch_size]
            # Cosine learning-rate decay to zero over the whole run.
            rate = 0.5 * config.learning_rate * (1 + np.cos(np.pi * step / total_steps))
            step += 1
            x = x_all[batch]
            if config.input_dropout:
                x = x * (rng.random(x.shape) >= config.input_dropout) / (1 - config.input_dropout)
            activations, masks = [x], []
            for index, (weight, bias) in enumerate(layers):
                z = activations[-1] @ weight + bias
                if index < len(layers) - 1:
                    mask = (z > 0) * (rng.random(z.shape) >= config.dropout) / (1 - config.dropout)
                    masks.append(mask)
                    z = z * mask
                activations.append(z.astype(np.float32))
            probs = _softmax(activations[-1])
            weights = class_weight[targets[batch]][:, None]
            grad = (probs - smooth[targets[batch]]) * weights / len(batch)
            grads: list[np.ndarray] = []
            for index in range(len(layers) - 1, -1, -1):
                weight, _ = layers[index]
                grads = [activations[index].T @ grad, grad.sum(axis=0)] + grads
                if index > 0:
                    grad = (grad @ weight.T) * masks[index - 1]
            optimiser.step(grads, rate)
    return Head(labels, mean.astype(np.float32), scale.astype(np.float32), layers)


def compose(backbone: onnx.ModelProto, head: Head, feature_outputs: tuple[str, ...]) -> onnx.ModelProto:
    """Replace the backbone's ImageNet classifier with the trained head.

    The head reads the concatenation of ``feature_outputs`` (as the training features were
    built), its standardisation is folded into the first layer, and its softmax becomes the
    ``probabilities`` output. The ``embedding`` output stays.
    """
    model = onnx.ModelProto()
    model.CopyFrom(backbone)
    graph = model.graph

    # Drop the ImageNet classifier: every node that only feeds the old probabilities output.
    needed: set[str] = set()
    keep_outputs = {EMBEDDING, *feature_outputs}
    producers = {out: node for node in graph.node for out in node.output}
    stack = list(keep_outputs)
    while stack:
        tensor = stack.pop()
        node = producers.get(tensor)
        if node is None or node.name in needed:
            continue
        needed.add(node.name)
        stack.extend(node.input)
    kept_nodes = [node for node in graph.node if node.name in needed]
    used_inputs = {name for node in kept_nodes for name in node.input}
    kept_initializers = [init for init in graph.initializer if init.name in used_inputs]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)

    first_weight, first_bias = head.layers[0]
    folded_weight = (first_weight * head.scale[:, None]).astype(np.float32)
    folded_bias = (first_bias - (head.mean * head.scale) @ first_weight).astype(np.float32)
    layers = [(folded_weight, folded_bias)] + head.layers[1:]

    nodes = []
    if len(feature_outputs) > 1:
        nodes.append(helper.make_node("Concat", list(feature_outputs), ["head/features"], name="head/concat", axis=1))
        current = "head/features"
    else:
        current = feature_outputs[0]
    for index, (weight, bias) in enumerate(layers):
        w_name, b_name = f"head/dense{index}/weight", f"head/dense{index}/bias"
        graph.initializer.extend([numpy_helper.from_array(weight, w_name), numpy_helper.from_array(bias, b_name)])
        out = f"head/dense{index}"
        nodes.append(helper.make_node("Gemm", [current, w_name, b_name], [out], name=out))
        current = out
        if index < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"{out}/relu"], name=f"{out}/relu"))
            current = f"{out}/relu"
    nodes.append(helper.make_node("Softmax", [current], [PROBABILITIES], name="head/softmax", axis=-1))
    graph.node.extend(nodes)

    outputs = [o for o in graph.output if o.name == EMBEDDING]
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(PROBABILITIES, onnx.TensorProto.FLOAT, ["batch", len(head.labels)])])
    graph.output.extend(outputs)
    del graph.value_info[:]
    graph.name = "sortline"
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model)
