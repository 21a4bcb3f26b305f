"""Every reader is bounded by what its file declares (issue 21, family 2 and the nesting and
type cases of family 5; docs/design.md 4.5): packed files, checkpoints, IDX files, recipes,
images and image counts. A hostile file is one clear error, quickly and in little memory."""

from __future__ import annotations

import base64
import copy
import gzip
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hostile import (
    MiB,
    billion_laughs,
    gzip_bomb,
    index_of,
    join,
    one_line,
    png_header_only,
    run,
    set_index,
    split,
    zlib_bomb,
)
from PIL import Image

from mcn_compress import limits
from mcn_compress.errors import CheckpointError, ConfigError, DataError
from mcn_compress.fashion_mnist import load_fashion_mnist
from mcn_compress.formats.load import load
from mcn_compress.idx import read_idx
from mcn_compress.images import read_image
from mcn_compress.limits import inflate, json_depth_exceeds, nesting_problem
from mcn_compress.training.recipe import load_recipe
from mcn_compress.training.schema import show_value

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture
def packed(files: dict[str, Any], tmp_path: Path) -> Path:
    return Path(shutil.copy(files["packed"], tmp_path / "m.mcn"))


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 32, 32))


# --- helpers against naive references --------------------------------------------------------
def _naive_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max([_naive_depth(v) for v in value.values()], default=0)
    if isinstance(value, list):
        return 1 + max([_naive_depth(v) for v in value], default=0)
    return 0


def test_json_depth_matches_a_naive_parse() -> None:
    rng = random.Random(0)
    tricky = ["a[b{", '\\"]]{', "\\\\", 'x\\\\"[', 1, None, "]}]", "[[{{"]

    def make(depth: int) -> Any:
        roll = rng.random()
        if depth <= 0 or roll < 0.3:
            return rng.choice(tricky)
        if roll < 0.65:
            return [make(depth - 1) for _ in range(rng.randrange(3))]
        return {f'k{i}["': make(depth - 1) for i in range(rng.randrange(3))}

    for _ in range(300):
        value = make(rng.randrange(10))
        text = json.dumps(value)
        for limit in (0, 1, 3, 6):
            want = _naive_depth(value) > limit
            assert json_depth_exceeds(text, limit) is want, (text, limit)
            assert json_depth_exceeds(text.encode(), limit) is want


def test_inflate_stops_at_its_limit_and_matches_zlib() -> None:
    data = os.urandom(5000) + b"\0" * 100_000
    packed = zlib.compress(data)
    assert inflate(packed, len(data)) == data
    assert inflate(packed, len(data) - 1) is None
    two = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = two.compress(data) + two.flush()
    assert inflate(member + member, 2 * len(data), gzip=True) == data + data
    assert inflate(member + member, 2 * len(data) - 1, gzip=True) is None
    with pytest.raises(EOFError):
        inflate(packed[:-10], len(data))
    assert inflate(zlib_bomb(b"[", b" ", 64 * MiB), 16 * MiB) is None


def test_nesting_problem_counts_shared_containers_each_time() -> None:
    deep: list[Any] = []
    node = deep
    for _ in range(100):
        node.append([])
        node = node[0]
    assert "more than 64 deep" in str(nesting_problem(deep))
    assert nesting_problem({"a": [[{"b": 1}]]}) is None
    laughs: list[Any] = ["lol"] * 10
    for _ in range(6):
        laughs = [laughs] * 10  # 10^7 items, ~60 distinct objects
    assert "more than 1,000 items" in str(nesting_problem(laughs, max_items=1000))


# --- packed files ----------------------------------------------------------------------------
def test_packed_index_bomb_is_refused(packed: Path) -> None:
    header, data = split(packed.read_bytes())
    bomb = zlib_bomb(b"[", b" ", 4096 * MiB)  # 4 GiB of JSON whitespace in ~4 MB
    header["__metadata__"]["index"] = base64.b64encode(bomb).decode()
    packed.write_bytes(join(header, data))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="index expands to more than") as info:
        load(packed)
    assert time.perf_counter() - start < 10 and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda index: index[0].__setitem__(2, [-1, *index[0][2][1:]]),
        lambda index: index[0].__setitem__(2, [2**61] * 8),
        lambda index: index[0].__setitem__(2, [True]),
        lambda index: index[0].__setitem__(2, [1.5]),
        lambda index: index[0].__setitem__(2, [1] * 9),
        lambda index: index[0].__setitem__(1, 5),
        lambda index: index.append(index[0]),
        lambda index: index.__setitem__(0, "x"),
        lambda index: index.__setitem__(slice(None), [[["x"]]] * 100),
    ],
)
def test_packed_index_entries_are_checked_before_allocating(packed: Path, edit: Any) -> None:
    header, data = split(packed.read_bytes())
    index = index_of(header)
    edit(index)
    set_index(header, index)
    packed.write_bytes(join(header, data))
    with pytest.raises(CheckpointError, match="is corrupt") as info:
        load(packed)
    assert "\n" not in str(info.value)


def test_deep_packed_headers_are_refused_before_parsing(packed: Path) -> None:
    header, data = split(packed.read_bytes())
    deep = copy.deepcopy(header)
    deep["__metadata__"]["description"] = "[" * 20000 + "]" * 20000
    (packed.parent / "desc.mcn").write_bytes(join(deep, data))
    with pytest.raises(CheckpointError, match="description nests deeper than 64"):
        load(packed.parent / "desc.mcn")
    raw = join(copy.deepcopy(header), data)
    size = int.from_bytes(raw[:8], "little")
    text = raw[8 : 8 + size].rstrip()
    deeper = text[:-1] + b',"x":' + b"[" * 20000 + b"]" * 20000 + b"}"
    deeper += b" " * (-len(deeper) % 8)
    (packed.parent / "head.mcn").write_bytes(len(deeper).to_bytes(8, "little") + deeper + data)
    with pytest.raises(CheckpointError, match="header nests deeper than 64"):
        load(packed.parent / "head.mcn")


def test_packed_truncations_and_mutations_load_identically_or_fail_in_one_line(
    packed: Path,
) -> None:
    """Fuzz: truncations and random bytes in the header give the same model or one
    `CheckpointError`, never another exception (the checksum is recomputed for the
    structured edits, as an attacker would)."""
    raw = packed.read_bytes()
    want = _outputs(load(packed))
    size = int.from_bytes(raw[:8], "little")
    rng = random.Random(21)
    cases = [raw[:cut] for cut in (0, 7, 8, 9, 100, size + 7, size + 8, size + 9, len(raw) - 1)]
    for _ in range(120):
        mutated = bytearray(raw)
        mutated[rng.randrange(size + 8)] = rng.randrange(256)
        cases.append(bytes(mutated))
    header, data = split(raw)
    odd = [-1, 0, 2**40, 1.5, True, None, "x", [], {}, "float32", "signs", "qint8", "qscale"]
    for _ in range(60):
        edited, index = copy.deepcopy(header), index_of(header)
        description = json.loads(edited["__metadata__"]["description"])
        entry = index[rng.randrange(len(index))]
        roll = rng.random()
        if roll < 0.4 and entry[2]:
            entry[2][rng.randrange(len(entry[2]))] = rng.choice(odd)
        elif roll < 0.6:
            entry[rng.randrange(3)] = rng.choice(odd)
        elif roll < 0.8:
            section = rng.choice(["model", "mcn", "state_dict_metadata", "float_layers"])
            if isinstance(description.get(section), dict) and rng.random() < 0.7:
                key = rng.choice(list(description[section]))
                description[section][key] = rng.choice(odd)
            else:
                description[section] = rng.choice(odd)
        else:
            edited["__metadata__"]["version"] = rng.choice(["0", "2.0", " 2", "٣", "4", "-1"])
        set_index(edited, index)
        edited["__metadata__"]["description"] = json.dumps(description)
        cases.append(join(edited, data))
    loaded = 0
    for case in cases:
        packed.write_bytes(case)
        try:
            model = load(packed)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            continue
        assert torch.equal(_outputs(model), want)
        loaded += 1
    assert loaded < len(cases)


def test_packed_version_words(packed: Path) -> None:
    header, data = split(packed.read_bytes())
    for version, words in (("x", "not a valid packed format version"), ("9", "upgrade")):
        header["__metadata__"]["version"] = version
        packed.write_bytes(join(header, data))
        one_line(run("report", str(packed)), words)


# --- checkpoints -------------------------------------------------------------------------------
def _edited_checkpoint(files: dict[str, Any], path: Path, **changes: Any) -> Path:
    data = torch.load(files["ckpt"], weights_only=True)
    data.update(changes)
    torch.save(data, path)
    return path


def test_checkpoint_nesting_is_refused_before_the_checksum(
    files: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep: list[Any] = []
    node = deep
    for _ in range(200):
        node.append([])
        node = node[0]
    meta = torch.load(files["ckpt"], weights_only=True)["metadata"]
    path = _edited_checkpoint(files, tmp_path / "deep.pt", metadata={**meta, "x": deep})

    def no_digest(*args: Any) -> str:
        raise AssertionError("the digest walked a structure the nesting check must refuse")

    monkeypatch.setattr("mcn_compress.formats.checkpoint.content_digest", no_digest)
    one_line(run("report", str(path)), "nests containers more than 64 deep")
    laughs: list[Any] = ["lol"] * 10
    for _ in range(3):
        laughs = [laughs] * 10
    path = _edited_checkpoint(files, tmp_path / "laughs.pt", metadata={**meta, "x": laughs})
    monkeypatch.setattr(limits, "MAX_ITEMS", 5000)
    one_line(run("export", str(path), "-o", str(tmp_path / "o.mcn")), "more than 5,000 items")
    assert not (tmp_path / "o.mcn").exists()


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"mcn": {"clip": "x"}}, "clip must be a positive number"),
        ({"mcn": {"include": 5}}, "include must be a list of regex strings"),
        ({"mcn": {"exclude": "abc"}}, "exclude must be a list of regex strings"),
        ({"mcn": {"mcn1": "yes"}}, "mcn1 must be true or false"),
        ({"layers": [1, None]}, "'layers' holds a name that is not text"),
        ({"model": {"kwargs": "ab"}}, "invalid model source record"),
        ({"model": {"kwargs": {"num_classes": 10**12}}}, "expected an integer from 1 to"),
        ({"version": "2"}, "'2' is not a valid checkpoint format version"),
        ({"version": 3}, "upgrade mcn-compress"),
    ],
)
def test_stored_values_of_the_wrong_type_are_one_line(
    changes: dict[str, Any], words: str, files: dict[str, Any], tmp_path: Path
) -> None:
    data = torch.load(files["ckpt"], weights_only=True)
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    if "version" not in changes:  # version 1 files carry no checksum: the values are read
        data["version"] = 1
        data.pop("sha256")
    torch.save(data, tmp_path / "bad.pt")
    for args in (("report", str(tmp_path / "bad.pt")), ("export", str(tmp_path / "bad.pt"))):
        one_line(run(*args, *(["-o", str(tmp_path / "o.mcn")] if "export" in args else [])), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


# --- IDX files ---------------------------------------------------------------------------------
def _idx(dtype_code: int, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, dtype_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def _fashion(root: Path, train_images: bytes, train_labels: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train-images-idx3-ubyte.gz").write_bytes(train_images)
    (root / "train-labels-idx1-ubyte").write_bytes(train_labels)
    (root / "t10k-images-idx3-ubyte").write_bytes(_idx(8, (2, 28, 28)) + bytes(2 * 784))
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx(8, (2,)) + bytes(2))
    return root


def test_idx_gzip_bomb_is_refused_a_byte_past_its_header(tmp_path: Path) -> None:
    bomb = gzip_bomb(_idx(8, (60000, 28, 28)), b"\0", 4096 * MiB)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(bomb)
    start = time.perf_counter()
    with pytest.raises(DataError, match="IDX data has more bytes") as info:
        read_idx(path)
    assert time.perf_counter() - start < 10 and "\n" not in str(info.value)
    path.write_bytes(gzip_bomb(_idx(8, (2**31, 2**31)), b"\0", MiB))
    with pytest.raises(DataError, match="mcn-compress reads IDX files up to"):
        read_idx(path)


def test_idx_labels_out_of_range_are_named(tmp_path: Path) -> None:
    images = gzip.compress(_idx(8, (3, 28, 28)) + bytes(3 * 784))
    for code, labels, words in (
        (9, bytes([0, 255, 1]), "label -1 out of range"),
        (8, bytes([0, 10, 1]), "label 10 out of range"),
        (8, bytes([0, 1]), "expected 3 integer labels, got 2"),
    ):
        root = _fashion(tmp_path / f"f{code}{len(labels)}{labels[1]}", images, b"")
        (root / "train-labels-idx1-ubyte").write_bytes(_idx(code, (len(labels),)) + labels)
        with pytest.raises(DataError, match=words):
            load_fashion_mnist(root, train=True)


def test_cli_fashion_mnist_bomb_is_one_line(tmp_path: Path) -> None:
    root = _fashion(
        tmp_path / "fm",
        gzip_bomb(_idx(8, (60000, 28, 28)), b"\0", 512 * MiB),
        _idx(8, (60000,)) + bytes(60000),
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: mcn_resnet_tiny, pretrained: false, num_classes: 10, in_chans: 1}\n"
        f"data: {{dataset: fashion_mnist, root: {root}, workers: 0}}\n"
        f"output: {{dir: {tmp_path / 'run'}}}\n"
    )
    one_line(run("finetune", "-r", str(recipe), "-q"), "train-images-idx3-ubyte.gz", "IDX data")
    assert not (tmp_path / "run").exists()


# --- recipes (YAML) ----------------------------------------------------------------------------
def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (billion_laughs() + "model: {name: x}\n", "stands for more than 100,000 values"),
        ("model: " + "[" * 20000 + "]" * 20000 + "\n", "nests deeper than 32 levels"),
        ("model: &a [*a]\n", "refers to a value that contains it"),
        ("runtime: {seed: " + "9" * 5000 + "}\n", "a value cannot be read"),
        ("data: [" + "0, " * 120_000 + "]\n", "stands for more than 100,000 values"),
    ],
)
def test_hostile_yaml_is_refused_before_values_are_built(
    text: str, words: str, tmp_path: Path
) -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=words) as info:
        load_recipe(_recipe(tmp_path, text))
    assert time.perf_counter() - start < 10 and "\n" not in str(info.value)


def test_large_recipes_and_set_values_are_bounded(tmp_path: Path) -> None:
    big = _recipe(tmp_path, "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="reads recipes up to 1,048,576"):
        load_recipe(big)
    good = _recipe(tmp_path, "model: {name: test_resnet}\ndata: {dataset: synthetic}\n")
    with pytest.raises(ConfigError, match="stands for more than"):
        load_recipe(good, ["data.train_samples=" + "[" + "1, " * 200_000 + "]"])


def test_messages_never_print_a_huge_value_whole() -> None:
    value: Any = list(range(10))
    for _ in range(6):
        value = [value] * 10  # repr would be ~30 MB
    start = time.perf_counter()
    text = show_value(value)
    assert time.perf_counter() - start < 1 and len(text) < 80


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("runtime.seed", 10**23, "runtime.seed: expected at most 4,294,967,295"),
        ("data.image_size", 100_000, "data.image_size: expected at most 4,096"),
        ("data.train_samples", 10**9, "data.train_samples: expected at most 1,000,000"),
    ],
)
def test_integer_ranges(key: str, value: int, words: str, tmp_path: Path) -> None:
    section, name = key.split(".")
    data = {
        "model": {"name": "test_resnet", "pretrained": False},
        "data": {"dataset": "synthetic"},
        "output": {"dir": str(tmp_path / "run")},
    }
    data.setdefault(section, {})[name] = value
    one_line(run("finetune", "-r", str(_recipe(tmp_path, yaml.safe_dump(data)))), words)
    assert not (tmp_path / "run").exists()


# --- images and image counts -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "words"),
    [
        (png_header_only(30000, 30000), "could be decompression bomb"),
        (png_header_only(9000, 9000), "more than the 67,108,864 mcn-compress decodes"),
        (b"not an image at all", "cannot identify image file"),
        ("truncated", "image file is truncated"),
    ],
)
def test_bad_images_are_one_line_naming_the_file(
    content: bytes | str, words: str, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    if content == "truncated":  # a real photo-like PNG, cut in half
        noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
        noise.save(folder / "whole.png")
        content = (folder / "whole.png").read_bytes()[:3000]
        (folder / "whole.png").unlink()
    (folder / "a.png").write_bytes(content)
    with pytest.raises(DataError, match=words):
        read_image(folder / "a.png", "RGB")
    one_line(
        run(
            "convert", "test_resnet", "--no-pretrained", "--calibrate-data", str(folder),
            "-o", str(tmp_path / "m.pt"),
        ),
        "cannot read image",
        "a.png",
    )  # fmt: skip
    for split_name in ("train", "val"):
        (tmp_path / "tree" / split_name / "c").mkdir(parents=True)
        shutil.copy(folder / "a.png", tmp_path / "tree" / split_name / "c" / "a.png")
    recipe = _recipe(
        tmp_path,
        "model: {name: test_resnet, pretrained: false}\n"
        f"data: {{dataset: imagefolder, root: {tmp_path / 'tree'}, workers: 0, image_size: 16}}\n"
        f"output: {{dir: {tmp_path / 'run'}}}\n",
    )
    one_line(run("finetune", "-r", str(recipe), "-q"), "cannot read image", "a.png")
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "run").exists()


def test_absurd_calibration_counts_are_refused_before_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was built before the count was checked")

    monkeypatch.setattr("mcn_compress.models.load_float_model", never)
    for count in ("1000000000", "1000001"):
        one_line(
            run(
                "convert", "test_resnet", "--no-pretrained", "--calibrate-data", "synthetic",
                "--calibrate-images", count, "-o", str(tmp_path / "m.pt"),
            ),
            f"--calibrate-images {count}: expected 1 to 1,000,000",
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


# --- memory: every bomb, under `ulimit -v 4000000` ---------------------------------------------
BOMBS = textwrap.dedent(
    """
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (4_000_000 * 1024, 4_000_000 * 1024))
    from pathlib import Path
    from mcn_compress.idx import read_idx
    from mcn_compress.errors import MCNError
    from mcn_compress.formats.load import load
    from mcn_compress.images import read_image
    from mcn_compress.training.recipe import load_recipe
    folder = Path(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, read in (
        ("bomb.mcn", load),
        ("train-images-idx3-ubyte.gz", read_idx),
        ("laughs.yaml", load_recipe),
        ("bomb.png", lambda p: read_image(p, "RGB")),
    ):
        start = time.perf_counter()
        try:
            read(folder / name)
            print(name, "LOADED")
        except MCNError as exc:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(name, round(time.perf_counter() - start, 2), before, peak, str(exc)[:60])
    """
)


def test_bombs_are_refused_fast_in_little_memory(files: dict[str, Any], tmp_path: Path) -> None:
    """Under RLIMIT_AS of 4,000,000 KiB (`ulimit -v 4000000`) each bomb is refused within
    10 s, and the process's peak resident memory stays under 1 GiB (an unbounded reader
    would need 3 GiB or more, or fail with MemoryError)."""
    header, data = split(Path(files["packed"]).read_bytes())
    header["__metadata__"]["index"] = base64.b64encode(zlib_bomb(b"[", b" ", 6144 * MiB)).decode()
    (tmp_path / "bomb.mcn").write_bytes(join(header, data))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(
        gzip_bomb(_idx(8, (60000, 28, 28)), b"\0", 6144 * MiB)
    )
    (tmp_path / "laughs.yaml").write_text(
        billion_laughs() + "model: {name: test_resnet}\ndata: {dataset: synthetic}\n"
    )
    (tmp_path / "bomb.png").write_bytes(png_header_only(12000, 12000))  # 144 Mpx, under PIL's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    done = subprocess.run(
        [sys.executable, "-c", BOMBS, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    assert len(rows) == 4 and all("LOADED" not in row for row in rows), done.stdout
    for name, seconds, before_kib, peak_kib, *_ in rows:
        assert float(seconds) < 10, (name, seconds)
        assert int(peak_kib) < 1024 * 1024, (name, peak_kib)  # KiB on Linux
        assert int(peak_kib) - int(before_kib) < 256 * 1024, (name, before_kib, peak_kib)
