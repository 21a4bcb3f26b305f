"""Checkpoint format: round trip, refusal of pickled code, foreign and damaged files, atomicity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mcn_compress import CheckpointError, MCNConfig, convert, info_of, load, load_float_model, save
from mcn_compress.formats.atomic import atomic_write
from mcn_compress.formats.checkpoint import FORMAT_VERSION, read_checkpoint


@pytest.fixture(scope="module")
def mcn() -> torch.nn.Module:
    model = load_float_model("resnet10t", pretrained=False, num_classes=5).eval()
    return convert(model, MCNConfig(planes=2, mcn1=True)).eval()


def test_round_trip_and_contents(mcn: torch.nn.Module, tmp_path: Path) -> None:
    path = save(mcn, tmp_path / "m.pt", metrics={"top1": 1.5})
    data = torch.load(path, weights_only=True)
    assert data["format"] == "mcn-compress.checkpoint" and data["version"] == FORMAT_VERSION
    assert data["model"]["name"] == "resnet10t" and data["model"]["kwargs"] == {"num_classes": 5}
    assert data["mcn"]["planes"] == 2 and data["mcn"]["mcn1"] is True
    assert data["metadata"]["metrics"] == {"top1": 1.5}
    assert "torch" in data["metadata"]["versions"]
    reloaded = load(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), mcn(x))
    assert info_of(reloaded).config == info_of(mcn).config
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # an ordinary file mode, not 0600


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {_Payload.marker}",))

    marker = ""


def test_pickled_code_is_refused_and_never_runs(mcn: torch.nn.Module, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    path = tmp_path / "evil.pt"
    data = torch.load(save(mcn, tmp_path / "good.pt"), weights_only=True)
    data["metadata"]["payload"] = _Payload()
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="refused"):
        load(path)
    assert not marker.exists()


def test_foreign_truncated_and_missing_files(mcn: torch.nn.Module, tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save(mcn.state_dict(), plain)
    with pytest.raises(CheckpointError, match="not an mcn-compress checkpoint"):
        load(plain)
    good = save(mcn, tmp_path / "good.pt")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(garbage)
    with pytest.raises(CheckpointError, match="no such file"):
        load(tmp_path / "missing.pt")


def test_newer_version_and_bad_fields(mcn: torch.nn.Module, tmp_path: Path) -> None:
    data = torch.load(save(mcn, tmp_path / "good.pt"), weights_only=True)
    newer = dict(data, version=FORMAT_VERSION + 1)
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="upgrade"):
        read_checkpoint(tmp_path / "newer.pt")
    broken = dict(data, layers="conv1")
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="layers"):
        read_checkpoint(tmp_path / "broken.pt")
    wrong = dict(data, version=1)  # version 1 files carry no checksum: the fit is checked
    wrong["state_dict"] = {k: v for k, v in data["state_dict"].items() if "fc" not in k}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load(tmp_path / "wrong.pt")
    edited = dict(data)  # the same edit in a version 2 file breaks its checksum
    edited["state_dict"] = wrong["state_dict"]
    torch.save(edited, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="damaged"):
        load(tmp_path / "edited.pt")


def test_save_needs_rebuild_info(tmp_path: Path) -> None:
    conv = torch.nn.Conv2d
    net = torch.nn.Sequential(conv(3, 8, 3), conv(8, 8, 3), conv(8, 4, 1), torch.nn.Flatten())
    with pytest.raises(CheckpointError, match="rebuild"):
        save(convert(net), tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer crashed")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    with pytest.raises(CheckpointError, match="does not exist"):
        atomic_write(tmp_path / "no" / "f.bin", lambda tmp: tmp.write_bytes(b"x"))


def test_config_version_is_stored_and_a_newer_one_refused(
    mcn: torch.nn.Module, tmp_path: Path
) -> None:
    data = torch.load(save(mcn, tmp_path / "good.pt"), weights_only=True)
    assert data["mcn"]["version"] == MCNConfig.VERSION == 1
    # edited dicts are saved as format version 1, which carries no checksum
    old = dict(data, version=1, mcn={k: v for k, v in data["mcn"].items() if k != "version"})
    torch.save(old, tmp_path / "old.pt")  # written before configs carried a version
    assert info_of(load(tmp_path / "old.pt")).config == info_of(mcn).config
    torch.save(dict(data, version=1, mcn={**data["mcn"], "version": 2}), tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="upgrade mcn-compress"):
        load(tmp_path / "newer.pt")
