"""Seeded random module configurations through the kernels against nn (or the peephole equations) in
float64, with every output and gradient: the combinations that the hand-picked cases of the other files
leave out (layers × directions × projections × packing × states × layouts × sizes × backward paths)."""

from __future__ import annotations

import random

import pytest
from helpers import KERNEL_DTYPES
from test_modules import Case, check_against_nn
from test_peephole import _check_against_oracle

SEEDS = range(24)


def random_case(seed: int) -> tuple[Case, str, bool, dict, object]:
    """(case, cell, peephole, module kwargs, dtype) drawn from ``seed``."""
    rng = random.Random(seed)
    cell = rng.choice(["LSTM", "LSTM", "GRU"])
    H = rng.randint(1, 40)
    proj_size = rng.randint(1, H - 1) if cell == "LSTM" and H > 1 and rng.random() < 0.25 else 0
    peephole = cell == "LSTM" and not proj_size and rng.random() < 0.2
    packed = rng.random() < 0.35
    unbatched = not packed and rng.random() < 0.1
    case = Case(T=rng.randint(1, 9), B=rng.randint(1, 7), I=rng.randint(1, 40), H=H,
                num_layers=rng.choice([1, 1, 2, 3]), bidirectional=rng.random() < 0.4,
                batch_first=not unbatched and rng.random() < 0.5, bias=rng.random() < 0.8, proj_size=proj_size,
                with_state=rng.random() < 0.5, unbatched=unbatched, packed=packed)
    kwargs = {"backward": rng.choice(["fused", "fused", "reference"])}
    if cell == "LSTM" and not proj_size and not peephole and rng.random() < 0.15:
        kwargs["recompute_interval"] = rng.randint(1, 4)
    return case, cell, peephole, kwargs, rng.choice(KERNEL_DTYPES)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_configuration_matches_nn(seed):
    case, cell, peephole, kwargs, dtype = random_case(seed)
    if peephole:
        _check_against_oracle(case, dtype, seed=seed, **kwargs)
    else:
        check_against_nn(case, dtype, seed=seed, cell=cell, **kwargs)


def test_the_seeds_cover_the_options():
    """The seeds draw every option at least once (a narrower draw would test less than it claims)."""
    drawn = [random_case(seed) for seed in SEEDS]
    cases = [case for case, *_ in drawn]
    assert {cell for _, cell, *_ in drawn} == {"LSTM", "GRU"} and any(peephole for _, _, peephole, *_ in drawn)
    for option in ("bidirectional", "batch_first", "proj_size", "with_state", "unbatched", "packed"):
        assert any(getattr(case, option) for case in cases), option
    assert not all(case.bias for case in cases) and {case.num_layers for case in cases} == {1, 2, 3}
    assert {kwargs["backward"] for *_, kwargs, _ in drawn} == {"fused", "reference"}
    assert any("recompute_interval" in kwargs for *_, kwargs, _ in drawn)
    assert {dtype for *_, dtype in drawn} == set(KERNEL_DTYPES)
