"""Property-based fuzzing (hypothesis): field algebra, the config parser, the h5 reader.

Fields are small smooth random fields (a few low-frequency waves of at most ~1.5 px), compared
in the interior where no sample point leaves the grid. The config parser and the h5 reader get
random input and must answer with a valid result or a one-line MetroemError, never another
exception or a crash.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metroem import config, datasets, fields
from metroem.errors import MetroemError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
H = W = 32
MARGIN = 8  # interior: more than the largest displacement (3 x 1.5 px) plus bilinear support


@st.composite
def smooth_fields(draw, amplitude: float = 1.5) -> torch.Tensor:
    """(1, 2, H, W): per channel a constant plus two waves of one period or less per side."""
    ys, xs = torch.meshgrid(torch.arange(H) / H, torch.arange(W) / W, indexing="ij")
    channels = []
    for _ in range(2):
        c = draw(st.floats(-amplitude / 2, amplitude / 2))
        f = torch.full((H, W), c)
        for _ in range(2):
            a = draw(st.floats(-amplitude / 4, amplitude / 4))
            u, v = draw(st.integers(0, 1)), draw(st.integers(0, 1))
            phase = draw(st.floats(0, 2 * math.pi))
            f = f + a * torch.sin(2 * math.pi * (u * xs + v * ys) + phase)
        channels.append(f)
    return torch.stack(channels)[None].double()


def interior(t: torch.Tensor, margin: int = MARGIN) -> torch.Tensor:
    return t[..., margin:-margin, margin:-margin]


# --- fields ---------------------------------------------------------------------------------


@FUZZ
@given(smooth_fields(), smooth_fields(), smooth_fields())
def test_composition_is_associative_in_the_interior(a, b, c):
    left = fields.compose(fields.compose(a, b), c)
    right = fields.compose(a, fields.compose(b, c))
    assert (interior(left) - interior(right)).abs().max() < 0.05


@FUZZ
@given(smooth_fields())
def test_down_then_up_keeps_a_smooth_field(f):
    back = fields.upsample_field(fields.downsample_field(f, 1), 1)
    assert back.shape == f.shape
    assert (interior(back, 2) - interior(f, 2)).abs().max() < 0.05


@FUZZ
@given(smooth_fields(amplitude=1.0))
def test_warping_by_f_composed_with_its_inverse_is_identity(f):
    inv = fields.invert(f, steps=100, tol=1e-6)
    h = fields.compose(f, inv)
    assert interior(h).abs().max() < 0.02
    img = torch.rand(1, 1, H, W, generator=torch.Generator().manual_seed(0)).double()
    img = torch.nn.functional.avg_pool2d(img, 3, 1, 1)  # a little smooth, like EM
    warped = fields.warp_image(img, h)
    assert (interior(warped) - interior(img)).abs().max() < 0.02


@FUZZ
@given(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3), st.integers(1, 3), st.integers(1, 40),
       st.integers(1, 40))
def test_mean_translation_of_a_constant_field(x, y, n, h, w):
    f = torch.tensor([x, y], dtype=torch.float64).view(1, 2, 1, 1).expand(n, 2, h, w)
    expected = torch.tensor([[x, y]] * n, dtype=torch.float64)
    torch.testing.assert_close(fields.mean_translation(f), expected, rtol=1e-12, atol=1e-9)
    mask = torch.zeros(n, 1, h, w)
    mask[..., : max(1, h // 2), :] = 1
    torch.testing.assert_close(fields.mean_translation(f, mask), expected, rtol=1e-12,
                               atol=1e-9)


# --- the config parser -----------------------------------------------------------------------

SCHEMA = config.load_preset("scratch")


def _keys(node: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out += _keys(v, f"{prefix}{k}.")
    return out


REAL_KEYS = _keys(SCHEMA)
scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
keys = st.sampled_from(REAL_KEYS) | st.text(max_size=12) | st.sampled_from(
    ["per_mip.3.train.steps", "per_mip.x", "optimizer.params.momentum", "loss.bogus", "",
     "train..steps", "optimizer.params.lr"])


@FUZZ
@given(st.dictionaries(keys, values, max_size=4))
def test_random_override_mappings_give_a_config_or_a_metroem_error(over):
    try:
        cfg = config.load_config("scratch", overrides=over)
    except MetroemError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(cfg, dict) and set(cfg) == set(SCHEMA)
    for mip in cfg["per_mip"]:
        config.resolve(cfg, mip)


@FUZZ
@given(st.lists(st.tuples(keys, st.text(max_size=16)).map(lambda kv: f"{kv[0]}={kv[1]}")
                | st.text(max_size=20), max_size=4))
def test_random_override_strings_give_a_config_or_a_metroem_error(texts):
    texts = [texts] if isinstance(texts, str) else texts
    try:
        cfg = config.load_config("scratch", overrides=texts)
    except MetroemError as e:
        assert str(e)
        return
    assert isinstance(cfg, dict)


@FUZZ
@given(st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(REAL_KEYS[:12]) | st.text(max_size=6),
                                      inner, max_size=4), max_leaves=10))
def test_random_config_documents_give_a_config_or_a_metroem_error(tmp_path, doc):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        config.load_config("custom", str(path))
    except MetroemError as e:
        assert str(e)


# --- the h5 reader -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_file(tmp_path_factory):
    from helpers import isbi_section
    from PIL import Image

    folder = tmp_path_factory.mktemp("fuzz_h5")
    secs = [np.asarray(Image.open(isbi_section(i)))[:48, :48] for i in range(4)]
    pairs = np.stack([np.stack([secs[i + 1], secs[i]]) for i in range(3)])
    path = folder / datasets.image_filename(24, 24, 1, 0)
    datasets.write_image_dataset(str(path), pairs, dict(mip=0, x_offset=24, y_offset=24,
                                                        z=[1, 2, 3]),
                                 translation=np.array([[0, 0], [2, -2], [4, 0]]))
    return path.read_bytes(), pairs


def _read_all(folder: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    ds = datasets.PairDataset(folder, 0)
    try:
        items = [ds[i] for i in range(len(ds))]
    finally:
        ds.close()
    data = np.stack([np.concatenate([it["src"].numpy(), it["tgt"].numpy()]) for it in items])
    return data, np.stack([it["translation"].numpy() for it in items]), [it["z"] for it in items]


@FUZZ
@given(st.data())
def test_corrupted_or_truncated_h5_reads_correctly_or_fails_cleanly(tmp_path_factory,
                                                                    real_file, data):
    blob, pairs = real_file
    raw = bytearray(blob)
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            at = data.draw(st.integers(0, len(raw) - 1), label="offset")
            raw[at] = data.draw(st.integers(0, 255).filter(lambda b, a=at: b != raw[a]))
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / datasets.image_filename(24, 24, 1, 0)).write_bytes(bytes(raw))
    try:
        got, translation, z = _read_all(str(folder))
    except MetroemError as e:
        assert str(e) and "\n" not in str(e)
        return
    np.testing.assert_array_equal(got, pairs.astype(np.float32))
    np.testing.assert_array_equal(translation, [[0, 0], [2, -2], [4, 0]])
    assert z == [1, 2, 3]
    assert not [n for n in os.listdir(folder) if n.startswith(".")]


def test_a_flipped_byte_anywhere_is_caught_or_harmless(tmp_path, real_file):
    """A deterministic sweep: one corrupt byte at ~150 offsets spread over the whole file
    (superblock, object headers and attributes, chunk index, data, translations)."""
    blob, pairs = real_file
    outcomes = {"error": 0, "intact": 0}
    for k, at in enumerate(range(0, len(blob), max(1, len(blob) // 150))):
        raw = bytearray(blob)
        raw[at] ^= 0x5A
        folder = tmp_path / str(k)
        folder.mkdir()
        (folder / datasets.image_filename(24, 24, 1, 0)).write_bytes(bytes(raw))
        try:
            got, translation, z = _read_all(str(folder))
        except MetroemError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
            continue
        np.testing.assert_array_equal(got, pairs.astype(np.float32), err_msg=f"byte {at}")
        np.testing.assert_array_equal(translation, [[0, 0], [2, -2], [4, 0]])
        assert z == [1, 2, 3], f"byte {at}"
        outcomes["intact"] += 1
    assert outcomes["error"] > 50  # most of the file is checksummed
