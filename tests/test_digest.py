"""Damaged files are refused: the checkpoint's SHA-256 covers its tensors and description, the
packed file's covers its blobs and its header (`formats.digest`, `formats.packed`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from packed_bytes import blob_digest, join, split

from mcn_compress import CheckpointError, MCNConfig, convert, export_packed, load, save
from mcn_compress.formats.digest import content_digest
from mcn_compress.models import load_float_model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digest")
    model = convert(load_float_model("test_resnet", pretrained=False).eval(), MCNConfig(planes=4))
    return {"pt": save(model, root / "m.pt"), "mcn": export_packed(model, root / "m.mcn")}


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7, 0.9])
def test_flipped_bytes_in_a_checkpoint_are_refused(
    files: dict[str, Path], tmp_path: Path, where: float
) -> None:
    raw = bytearray(files["pt"].read_bytes())
    start = int(len(raw) * where)
    raw[start : start + 64] = bytes(b ^ 0xFF for b in raw[start : start + 64])
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as info:
        load(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_an_edited_packed_header_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    header, data = split(files["mcn"].read_bytes())
    description = json.loads(header["__metadata__"]["description"])
    assert description["mcn"]["clip"] == 1.0
    description["mcn"]["clip"] = 9.0
    header["__metadata__"]["description"] = json.dumps(description)
    bad = tmp_path / "edited.mcn"
    bad.write_bytes(join(header, data))
    with pytest.raises(CheckpointError, match="damaged"):
        load(bad)


def test_a_version_1_packed_file_still_loads(files: dict[str, Path], tmp_path: Path) -> None:
    header, data = split(files["mcn"].read_bytes())
    header["__metadata__"]["version"] = "1"
    header["__metadata__"]["sha256"] = blob_digest(header, data)
    old = tmp_path / "v1.mcn"
    old.write_bytes(join(header, data))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load(old)(x), load(files["mcn"])(x))


def test_content_digest_sees_every_value_and_ignores_key_order() -> None:
    base = {"a": torch.arange(4.0), "b": [1, "x", None], "c": {"d": 2.5}}
    assert content_digest(base) == content_digest(dict(reversed(list(base.items()))))
    changed = [
        {**base, "a": torch.tensor([0.0, 1.0, 2.0, 3.5])},
        {**base, "a": torch.arange(4.0).reshape(2, 2)},
        {**base, "a": torch.arange(4.0).double()},
        {**base, "b": [1, "y", None]},
        {**base, "c": {"d": 2.50001}},
        {**base, "e": 0},
    ]
    digests = {content_digest(d) for d in changed} | {content_digest(base)}
    assert len(digests) == len(changed) + 1
    assert content_digest({**base, "sha256": "anything"}) == content_digest(base)
