"""Embeddings of image files as the training job computes them, for comparison with the edge agent.

Each file goes through ``images.prepare`` (pyvips) and then through an ONNX model with a
``pixels`` input and an ``embedding`` output, one image per run. The command prints one JSON
object per file on its own line::

    {"file": "a.jpg", "pixelsSha256": "<hex>", "width": 224, "height": 224, "embedding": [...]}
    {"file": "b.jpg", "error": "cannot decode image: ..."}

``pixelsSha256`` is the sha256 of the prepared uint8 RGB bytes in row-major HWC order, the
same bytes the agent's ``prepareImage`` returns, so a matching hash means identical model input.

Usage::

    python -m sortline_spark.parity --model models/default/model.onnx [--manifest FILE] FILE...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .convert import EMBEDDING, PIXELS
from .images import ImageDecodeError, ResizePolicy, prepare


def load_policy(manifest_path: str | None) -> ResizePolicy:
    """Return the preprocessing policy of a model manifest, or the default policy without one.

    Raises
    ------
    ValueError
        If the manifest cannot be read or has no usable ``preprocess`` section.
    """
    if manifest_path is None:
        return ResizePolicy()
    try:
        document = json.loads(Path(manifest_path).read_text())
        return ResizePolicy.from_manifest(document["preprocess"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest_path}: cannot read the preprocess policy: {error}") from error


def embed_file(session: ort.InferenceSession, path: str, policy: ResizePolicy) -> dict:
    """Prepare one image file and run it through the model.

    Returns
    -------
    dict
        ``file``, ``pixelsSha256``, ``width``, ``height`` and ``embedding`` for a decoded image,
        or ``file`` and ``error`` for a file that cannot be read or decoded.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        pixels = prepare(data, policy)
    except OSError as error:
        return {"file": path, "error": f"cannot read file: {error.strerror}"}
    except ImageDecodeError as error:
        return {"file": path, "error": str(error)}

    pixels = np.ascontiguousarray(pixels)
    embedding = session.run([EMBEDDING], {PIXELS: pixels[np.newaxis]})[0][0]
    return {
        "file": path,
        "pixelsSha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
        "width": int(pixels.shape[1]),
        "height": int(pixels.shape[0]),
        "embedding": [float(value) for value in embedding.astype(np.float32)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print the pyvips-prepared pixel hash and model embedding of each image file as JSON lines."
    )
    parser.add_argument("--model", required=True, help="ONNX model with a 'pixels' input and an 'embedding' output")
    parser.add_argument("--manifest", help="model manifest whose preprocess policy to apply (default: 256 px short side, 224 px crop)")
    parser.add_argument("files", nargs="+", metavar="FILE", help="image files")
    args = parser.parse_args(argv)

    try:
        policy = load_policy(args.manifest)
    except ValueError as error:
        parser.error(str(error))

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's load errors (NoSuchFile, InvalidProtobuf, ...) derive from Exception only
        print(f"parity: cannot load {args.model}: {error}", file=sys.stderr)
        return 1
    if EMBEDDING not in [output.name for output in session.get_outputs()]:
        print(f"parity: {args.model} has no '{EMBEDDING}' output", file=sys.stderr)
        return 1

    for path in args.files:
        print(json.dumps(embed_file(session, path, policy)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
