"""Conversion of a Keras (TF.js layers) image classifier into an ONNX graph.

The graph takes decoded uint8 RGB pixels in NHWC layout and does the preprocessing the
weights expect itself, so that no caller re-implements channel order and mean subtraction.
All image layers run in NCHW after one transpose at the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .tfjs import LayersModel, Layer, ModelFormatError

OPSET = 17
PIXELS = "pixels"
PROBABILITIES = "probabilities"
EMBEDDING = "embedding"


@dataclass(frozen=True)
class InputNormalization:
    """Preprocessing of uint8 RGB pixels that the imported weights were trained with.

    ``channel_order`` is the order the first layer expects ("BGR" for Keras "caffe" mode);
    ``mean`` and ``scale`` are per channel in RGB order: ``x = (pixel - mean) * scale``.
    """

    channel_order: str
    mean: tuple[float, float, float]
    scale: tuple[float, float, float]


# Keras ResNet-50 v1 ("caffe" mode): BGR, ImageNet means subtracted, no scaling.
CAFFE = InputNormalization("BGR", (123.68, 116.779, 103.939), (1.0, 1.0, 1.0))


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str | None = None, **attrs) -> str:
        self._count += 1
        self.nodes.append(helper.make_node(op, inputs, [output], name=name or f"{op}_{self._count}", **attrs))
        return output


def _activation(builder: _GraphBuilder, kind: str, tensor: str, name: str) -> str:
    if kind in (None, "linear"):
        return tensor
    ops = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}
    if kind in ops:
        return builder.node(ops[kind], [tensor], f"{name}/{kind}", name=f"{name}/{kind}")
    if kind == "softmax":
        return builder.node("Softmax", [tensor], f"{name}/softmax", name=f"{name}/softmax", axis=-1)
    raise ModelFormatError(f"layer {name!r}: activation {kind!r} is not supported")


def _conv_pads(config: dict, kernel: tuple[int, int]) -> dict:
    padding = config.get("padding", "valid")
    if padding == "valid":
        return {"pads": [0, 0, 0, 0]}
    if padding == "same":
        # TensorFlow puts the odd pixel of "same" padding at the bottom/right, as SAME_UPPER does.
        return {"auto_pad": "SAME_UPPER"}
    raise ModelFormatError(f"layer {config.get('name')!r}: padding {padding!r} is not supported")


def _zero_padding(config: dict) -> list[int]:
    padding = config["padding"]
    if isinstance(padding, int):
        (top, bottom), (left, right) = (padding, padding), (padding, padding)
    elif isinstance(padding[0], int):
        (top, bottom), (left, right) = (padding[0], padding[0]), (padding[1], padding[1])
    else:
        (top, bottom), (left, right) = padding
    return [top, left, bottom, right]


def _check_channels_last(layer: Layer) -> None:
    fmt = layer.config.get("data_format", "channels_last")
    if fmt != "channels_last":
        raise ModelFormatError(f"layer {layer.name!r}: data_format {fmt!r} is not supported")


def _fold_batch_norm(kernel: np.ndarray, bias: np.ndarray, bn: Layer) -> tuple[np.ndarray, np.ndarray]:
    """Fold inference-mode batch normalisation into the preceding convolution (OIHW kernel)."""
    epsilon = float(bn.config.get("epsilon", 1e-3))
    channels = kernel.shape[0]
    gamma = bn.weights.get("gamma", np.ones(channels, np.float32))
    beta = bn.weights.get("beta", np.zeros(channels, np.float32))
    mean = bn.weights["moving_mean"]
    variance = bn.weights["moving_variance"]
    factor = gamma / np.sqrt(variance + epsilon)
    return (kernel * factor[:, None, None, None]).astype(np.float32), ((bias - mean) * factor + beta).astype(np.float32)


class KerasToOnnx:
    """Translate a ``LayersModel`` into ONNX, layer by layer."""

    def __init__(
        self, model: LayersModel, normalization: InputNormalization, embedding_layer: str | None,
        pooled_outputs: dict[str, str],
    ) -> None:
        self.model = model
        self.normalization = normalization
        self.embedding_layer = embedding_layer
        self.pooled_outputs = pooled_outputs
        self.builder = _GraphBuilder()
        self.tensor: dict[str, str] = {}
        self.pending_padding: dict[str, tuple[str, list[int]]] = {}
        self.folded: set[str] = set()
        self.first_conv_seen = False

    # Layers whose output is only used by one consumer can be fused into that consumer.
    def _single_consumer(self, name: str) -> Layer | None:
        consumers = self.model.consumers(name)
        exported = name in self.model.outputs or name == self.embedding_layer or name in self.pooled_outputs.values()
        if len(consumers) == 1 and not exported:
            return consumers[0]
        return None

    def _input(self) -> str:
        builder = self.builder
        norm = self.normalization
        floats = builder.node("Cast", [PIXELS], "pixels_float", name="preprocess/cast", to=TensorProto.FLOAT)
        centred = builder.node(
            "Sub", [floats, builder.constant("preprocess/mean", np.array(norm.mean, np.float32))], "pixels_centred",
            name="preprocess/subtract_mean",
        )
        scaled = centred
        if any(s != 1.0 for s in norm.scale):
            scaled = builder.node(
                "Mul", [centred, builder.constant("preprocess/scale", np.array(norm.scale, np.float32))],
                "pixels_scaled", name="preprocess/scale",
            )
        return builder.node("Transpose", [scaled], "pixels_nchw", name="preprocess/to_nchw", perm=[0, 3, 1, 2])

    def _conv(self, layer: Layer, source: str) -> str:
        _check_channels_last(layer)
        config = layer.config
        dilation = config.get("dilation_rate", [1, 1])
        dilations = [dilation, dilation] if isinstance(dilation, int) else list(dilation)
        kernel = np.transpose(layer.weights["kernel"], (3, 2, 0, 1)).astype(np.float32)
        bias = layer.weights.get("bias", np.zeros(kernel.shape[0], np.float32)).astype(np.float32)
        if not self.first_conv_seen:
            self.first_conv_seen = True
            if self.normalization.channel_order == "BGR":
                # The graph input is RGB, so the first layer's input channels are reordered instead of the pixels.
                kernel = kernel[:, ::-1, :, :].copy()

        output_name = layer.name
        bn = self._single_consumer(layer.name)
        activation = config.get("activation", "linear")
        if bn is not None and bn.class_name == "BatchNormalization" and activation in (None, "linear"):
            kernel, bias = _fold_batch_norm(kernel, bias, bn)
            self.folded.add(bn.name)
            output_name = bn.name

        attrs = _conv_pads(config, tuple(config["kernel_size"]))
        if source in self.pending_padding:
            source, pads = self.pending_padding.pop(source)
            if "auto_pad" in attrs:
                raise ModelFormatError(f"layer {layer.name!r}: zero padding before a 'same' convolution is not supported")
            attrs = {"pads": pads}
        builder = self.builder
        out = builder.node(
            "Conv",
            [source, builder.constant(f"{layer.name}/kernel", kernel), builder.constant(f"{layer.name}/bias", bias)],
            output_name, name=layer.name, kernel_shape=list(kernel.shape[2:]), strides=list(config.get("strides", [1, 1])),
            dilations=dilations, **attrs,
        )
        out = _activation(builder, activation, out, layer.name)
        self.tensor[output_name] = out
        return out

    def _pool(self, layer: Layer, source: str, op: str) -> str:
        _check_channels_last(layer)
        config = layer.config
        attrs = _conv_pads(config, tuple(config["pool_size"]))
        if source in self.pending_padding:
            if op != "MaxPool":
                raise ModelFormatError(f"layer {layer.name!r}: zero padding before average pooling is not supported")
            # ONNX pads MaxPool with -inf; Keras pads with 0 first. The two agree only for non-negative inputs.
            source, pads = self.pending_padding.pop(source)
            attrs = {"pads": pads}
        strides = config.get("strides") or config["pool_size"]
        return self.builder.node(op, [source], layer.name, name=layer.name, kernel_shape=list(config["pool_size"]),
                                 strides=list(strides), **attrs)

    def _dense(self, layer: Layer, source: str) -> str:
        builder = self.builder
        kernel = layer.weights["kernel"].astype(np.float32)
        bias = layer.weights.get("bias", np.zeros(kernel.shape[1], np.float32)).astype(np.float32)
        out = builder.node(
            "Gemm", [source, builder.constant(f"{layer.name}/kernel", kernel), builder.constant(f"{layer.name}/bias", bias)],
            layer.name + "/linear", name=layer.name,
        )
        return _activation(builder, layer.config.get("activation", "linear"), out, layer.name)

    def _batch_norm(self, layer: Layer, source: str) -> str:
        axis = layer.config.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) else axis
        if axis not in (-1, 3):
            raise ModelFormatError(f"layer {layer.name!r}: batch normalisation over axis {axis} is not supported")
        builder = self.builder
        channels = layer.weights["moving_mean"].shape[0]
        scale = layer.weights.get("gamma", np.ones(channels, np.float32))
        shift = layer.weights.get("beta", np.zeros(channels, np.float32))
        return builder.node(
            "BatchNormalization",
            [source, builder.constant(f"{layer.name}/gamma", scale), builder.constant(f"{layer.name}/beta", shift),
             builder.constant(f"{layer.name}/mean", layer.weights["moving_mean"]),
             builder.constant(f"{layer.name}/variance", layer.weights["moving_variance"])],
            layer.name, name=layer.name, epsilon=float(layer.config.get("epsilon", 1e-3)),
        )

    def _layer(self, layer: Layer, sources: list[str], rank4: bool) -> str:
        builder = self.builder
        kind = layer.class_name
        source = sources[0] if sources else ""
        if kind == "ZeroPadding2D":
            top, left, bottom, right = _zero_padding(layer.config)
            consumer = self._single_consumer(layer.name)
            if consumer is not None and consumer.class_name in ("Conv2D", "MaxPooling2D"):
                # Folded into the consumer's own pads.
                self.pending_padding[layer.name] = (source, [top, left, bottom, right])
                return layer.name
            pads = builder.constant(f"{layer.name}/pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
            return builder.node("Pad", [source, pads], layer.name, name=layer.name, mode="constant")
        if kind == "Conv2D":
            return self._conv(layer, source)
        if kind == "BatchNormalization":
            return self._batch_norm(layer, source)
        if kind == "Activation":
            return _activation(builder, layer.config["activation"], source, layer.name)
        if kind == "ReLU":
            return builder.node("Relu", [source], layer.name, name=layer.name)
        if kind == "MaxPooling2D":
            return self._pool(layer, source, "MaxPool")
        if kind == "AveragePooling2D":
            return self._pool(layer, source, "AveragePool")
        if kind == "GlobalAveragePooling2D":
            pooled = builder.node("GlobalAveragePool", [source], layer.name + "/pool", name=layer.name)
            return builder.node("Flatten", [pooled], layer.name, name=layer.name + "/flatten", axis=1)
        if kind == "GlobalMaxPooling2D":
            pooled = builder.node("GlobalMaxPool", [source], layer.name + "/pool", name=layer.name)
            return builder.node("Flatten", [pooled], layer.name, name=layer.name + "/flatten", axis=1)
        if kind == "Flatten":
            # Keras flattens channels_last tensors in H, W, C order.
            nhwc = builder.node("Transpose", [source], layer.name + "/nhwc", name=layer.name + "/nhwc", perm=[0, 2, 3, 1]) if rank4 else source
            return builder.node("Flatten", [nhwc], layer.name, name=layer.name, axis=1)
        if kind == "Dense":
            return self._dense(layer, source)
        if kind == "Add":
            out = sources[0]
            for index, other in enumerate(sources[1:]):
                out = builder.node("Add", [out, other], f"{layer.name}/{index}" if index < len(sources) - 2 else layer.name, name=f"{layer.name}/{index}")
            return out
        if kind == "Concatenate":
            axis = 1 if rank4 else -1
            return builder.node("Concat", sources, layer.name, name=layer.name, axis=axis)
        if kind in ("Dropout", "SpatialDropout2D"):
            return source
        raise ModelFormatError(f"layer {layer.name!r}: layer type {kind!r} is not supported")

    def convert(self) -> onnx.ModelProto:
        model = self.model
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ModelFormatError("only models with one input and one output are supported")
        _, height, width, channels = model.input_shape
        if channels != 3:
            raise ModelFormatError(f"input has {channels} channels; an RGB image model needs 3")

        rank4 = {model.inputs[0]: True}
        self.tensor[model.inputs[0]] = self._input()
        for layer in model.layers:
            if layer.class_name == "InputLayer":
                continue
            if layer.name in self.folded:
                rank4[layer.name] = True
                continue
            sources = [self.tensor[name] for name in layer.inbound]
            is_rank4 = all(rank4[name] for name in layer.inbound)
            self.tensor[layer.name] = self._layer(layer, sources, is_rank4)
            rank4[layer.name] = is_rank4 and layer.class_name not in ("GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten", "Dense")

        builder = self.builder
        output_layer = model.outputs[0]
        embedding_layer = self.embedding_layer or model.layer(output_layer).inbound[0]
        if rank4[embedding_layer]:
            raise ModelFormatError(f"embedding layer {embedding_layer!r} is not a flat vector")
        builder.node("Identity", [self.tensor[output_layer]], PROBABILITIES, name="output/probabilities")
        builder.node("Identity", [self.tensor[embedding_layer]], EMBEDDING, name="output/embedding")
        outputs = [
            helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", None]),
            helper.make_tensor_value_info(EMBEDDING, TensorProto.FLOAT, ["batch", None]),
        ]
        for output_name, layer_name in self.pooled_outputs.items():
            if not rank4[layer_name]:
                raise ModelFormatError(f"layer {layer_name!r} has no spatial map to pool")
            pooled = builder.node("GlobalAveragePool", [self.tensor[layer_name]], f"{output_name}/pool", name=f"output/{output_name}/pool")
            builder.node("Flatten", [pooled], output_name, name=f"output/{output_name}", axis=1)
            outputs.append(helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", None]))

        graph = helper.make_graph(
            builder.nodes, "backbone",
            [helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, ["batch", height, width, 3])],
            outputs,
            builder.initializers,
        )
        onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sortline")
        onnx_model.ir_version = 8
        onnx.checker.check_model(onnx_model)
        return onnx.shape_inference.infer_shapes(onnx_model)


def keras_to_onnx(
    model: LayersModel, normalization: InputNormalization = CAFFE, embedding_layer: str | None = None,
    pooled_outputs: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Convert a Keras image classifier to ONNX with preprocessing inside the graph.

    Parameters
    ----------
    model
        The loaded layers model, channels_last, one RGB input, one softmax output.
    normalization
        Channel order, mean and scale the weights expect.
    embedding_layer
        Layer whose flat output becomes the ``embedding`` output. Defaults to the input of
        the output layer (the pooled features before the classifier).
    pooled_outputs
        Extra outputs: output name to the layer whose feature map is average-pooled into it.

    Returns
    -------
    onnx.ModelProto
        Input ``pixels`` (uint8, NHWC, RGB); outputs ``probabilities`` and ``embedding``.
    """
    return KerasToOnnx(model, normalization, embedding_layer, pooled_outputs or {}).convert()
