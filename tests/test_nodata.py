"""No-data around the tissue must not change the field in it (the shipped ISBI pyramid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import isbi_section
from PIL import Image

import metroem

ISBI = Path(__file__).resolve().parents[1] / "models" / "isbi"
PAD = 64


def _pair(z: int) -> tuple[torch.Tensor, torch.Tensor]:
    # values >= 1: 0 is reserved for no data
    s, t = (torch.from_numpy(np.asarray(Image.open(isbi_section(i)), np.float32)).clamp_min(1)
            for i in (z, z - 1))
    return s[None, None], t[None, None]


def _change(aligner, src, tgt) -> torch.Tensor:
    """|field of the pair inside PAD px of no-data - field of the pair alone|, per pixel."""
    with torch.no_grad():
        alone = aligner(src, tgt)
        padded = aligner(F.pad(src, (PAD,) * 4), F.pad(tgt, (PAD,) * 4))
    return (padded[..., PAD:-PAD, PAD:-PAD] - alone).norm(dim=1)[0]


@pytest.fixture(autouse=True)
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("z", [1, 15, 29])  # the held-out sections
def test_no_data_around_a_section_leaves_its_field_alone(z):
    # Issue target: <= 0.05 px median and <= 0.5 px max on a 512^2 section padded with 64 px of
    # no-data on each side. The pairs need real alignment (fields of 6-11 px).
    src, tgt = _pair(z)
    change = _change(metroem.load_aligner(ISBI), src, tgt)
    assert float(change.median()) <= 0.05 and float(change.max()) <= 0.5, (
        float(change.median()), float(change.max()))


def test_without_nodata_awareness_the_same_padding_moves_the_field():
    # The same check with the no-data handling switched off fails it by far: the test can fail.
    src, tgt = _pair(15)
    off = metroem.load_aligner(ISBI, spec_changes={"nodata_aware": False})
    change = _change(off, src, tgt)
    assert float(change.max()) > 5.0 and float(change.median()) > 0.05
