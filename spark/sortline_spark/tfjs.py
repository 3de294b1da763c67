"""Reader for TensorFlow.js layers models (``model.json`` plus binary weight shards)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}
_QUANTIZED_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}


class ModelFormatError(ValueError):
    """A TF.js model file that this reader cannot interpret."""


@dataclass
class Layer:
    """One Keras layer of the functional graph."""

    name: str
    class_name: str
    config: dict[str, Any]
    inbound: list[str]
    weights: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class LayersModel:
    """A Keras functional model in topological order with its weights."""

    layers: list[Layer]
    inputs: list[str]
    outputs: list[str]
    input_shape: list[int | None]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"layer {name!r} not found")

    def consumers(self, name: str) -> list[Layer]:
        return [layer for layer in self.layers if name in layer.inbound]


def _inbound_names(raw_layer: dict[str, Any]) -> list[str]:
    nodes = raw_layer.get("inbound_nodes") or []
    if len(nodes) > 1:
        raise ModelFormatError(
            f"layer {raw_layer['name']!r} is called {len(nodes)} times; shared layers are not supported"
        )
    if not nodes:
        return []
    return [entry[0] for entry in nodes[0]]


def _read_weights(model_dir: Path, manifest: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Decode every weight of every group, in manifest order, from the concatenated shards."""
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        buffer = b"".join((model_dir / path).read_bytes() for path in group["paths"])
        offset = 0
        for spec in group["weights"]:
            shape = [int(d) for d in spec["shape"]]
            count = int(np.prod(shape)) if shape else 1
            stored_dtype = (spec.get("quantization") or spec)["dtype"]
            needed = offset + count * np.dtype(_QUANTIZED_DTYPES.get(stored_dtype) or _DTYPES.get(stored_dtype, np.float32)).itemsize
            if needed > len(buffer):
                raise ModelFormatError(
                    f"weight {spec['name']!r} ends at byte {needed} but the shards of its group hold {len(buffer)} bytes"
                )
            quantization = spec.get("quantization")
            if quantization:
                stored = _QUANTIZED_DTYPES.get(quantization["dtype"])
                if stored is None:
                    raise ModelFormatError(f"weight {spec['name']!r}: unsupported quantization {quantization['dtype']!r}")
                raw = np.frombuffer(buffer, dtype=stored, count=count, offset=offset)
                offset += raw.nbytes
                if stored is np.float16:
                    values = raw.astype(np.float32)
                else:
                    values = raw.astype(np.float32) * np.float32(quantization["scale"]) + np.float32(quantization["min"])
            else:
                dtype = _DTYPES.get(spec["dtype"])
                if dtype is None:
                    raise ModelFormatError(f"weight {spec['name']!r}: unsupported dtype {spec['dtype']!r}")
                values = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
                offset += values.nbytes
            weights[spec["name"]] = values.reshape(shape).copy()
        if offset != len(buffer):
            raise ModelFormatError(
                f"weight group {group['paths']}: shards hold {len(buffer)} bytes but the manifest describes {offset}"
            )
    return weights


def load_layers_model(model_json: str | Path) -> LayersModel:
    """Load a TF.js layers model.

    Parameters
    ----------
    model_json
        Path of ``model.json``; the shards are read from the same folder.

    Returns
    -------
    LayersModel
        Layers in file order, which Keras writes in topological order, each with its weights
        keyed by the short name (``kernel``, ``bias``, ``gamma`` ...).

    Raises
    ------
    ModelFormatError
        If the file is not a functional layers model or the shards do not match the manifest.
    """
    model_json = Path(model_json)
    document = json.loads(model_json.read_text())
    if document.get("format") not in (None, "layers-model"):
        raise ModelFormatError(f"{model_json}: format {document.get('format')!r} is not 'layers-model'")
    topology = document.get("modelTopology")
    if topology is None:
        raise ModelFormatError(f"{model_json}: missing modelTopology")
    config = topology.get("model_config", topology)
    if config.get("class_name") not in ("Model", "Functional"):
        raise ModelFormatError(f"{model_json}: class {config.get('class_name')!r} is not a functional Model")

    weights = _read_weights(model_json.parent, document.get("weightsManifest", []))
    layers: list[Layer] = []
    for raw in config["config"]["layers"]:
        layer = Layer(raw["name"], raw["class_name"], raw["config"], _inbound_names(raw))
        prefix = raw["name"] + "/"
        for key in [k for k in weights if k.startswith(prefix)]:
            layer.weights[key[len(prefix):].split(":")[0]] = weights.pop(key)
        layers.append(layer)
    if weights:
        raise ModelFormatError(f"{model_json}: weights without a layer: {sorted(weights)[:5]}")

    inputs = [entry[0] for entry in config["config"]["input_layers"]]
    outputs = [entry[0] for entry in config["config"]["output_layers"]]
    first_input = next(layer for layer in layers if layer.name == inputs[0])
    input_shape = list(first_input.config["batch_input_shape"])
    return LayersModel(layers, inputs, outputs, input_shape)
