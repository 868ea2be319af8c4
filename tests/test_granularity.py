"""quantcourse.granularity: parameter shapes, reduce/broadcast/expand agree, frozen values."""

import dataclasses

import pytest
import torch

from quantcourse import Granularity, PerChannel, PerGroup, PerTensor, PerToken

CASES = [
    (PerTensor(), (6, 32)),
    (PerTensor(), (2, 3, 8)),
    (PerChannel(0), (6, 32)),
    (PerChannel(1), (6, 32)),
    (PerChannel(-1), (2, 3, 8)),
    (PerChannel(0), (7,)),
    (PerToken(), (6, 32)),
    (PerToken(), (2, 3, 8)),
    (PerGroup(8), (6, 32)),
    (PerGroup(4), (2, 3, 8)),
    (PerGroup(7), (7,)),
]
IDS = [f"{g}-{list(s)}".replace(" ", "") for g, s in CASES]


@pytest.mark.parametrize("granularity, shape", CASES, ids=IDS)
def test_reduce_has_param_shape(granularity, shape):
    x = torch.randn(shape)
    assert tuple(granularity.reduce(x, torch.amax).shape) == granularity.param_shape(x.shape)


@pytest.mark.parametrize("granularity, shape", CASES, ids=IDS)
def test_every_element_lies_within_its_own_min_and_max(granularity, shape):
    x = torch.randn(shape)
    hi = granularity.expand(granularity.reduce(x, torch.amax), x)
    lo = granularity.expand(granularity.reduce(x, torch.amin), x)
    assert (x <= hi).all() and (x >= lo).all()
    # and each statistic is attained by some element of its set
    assert torch.equal(granularity.reduce((x == hi).float(), torch.amax), torch.ones(granularity.param_shape(shape)))


@pytest.mark.parametrize("granularity, shape", CASES, ids=IDS)
def test_broadcast_equals_expand(granularity, shape):
    x = torch.randn(shape)
    p = torch.rand(granularity.param_shape(x.shape)) + 0.5
    xv, pv = granularity.broadcast(x, p)
    assert torch.equal((xv / pv).reshape(x.shape), x / granularity.expand(p, x))


def test_per_group_broadcast_is_a_view():
    x = torch.randn(4, 64)
    xv, pv = PerGroup(16).broadcast(x, torch.ones(4, 4))
    assert xv.shape == (4, 4, 16) and pv.shape == (4, 4, 1)
    assert xv.data_ptr() == x.data_ptr()


def test_per_group_groups_are_consecutive_elements_of_the_last_dim():
    x = torch.arange(16.0).reshape(2, 8)
    assert PerGroup(4).reduce(x, torch.amax).tolist() == [[3.0, 7.0], [11.0, 15.0]]


def test_granularities_are_frozen_hashable_values():
    assert PerGroup(64) == PerGroup(64) and PerGroup(64) != PerGroup(32)
    assert len({PerTensor(), PerTensor(), PerChannel(0), PerChannel(0), PerToken()}) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        PerGroup(64).group_size = 32
    assert all(isinstance(g, Granularity) for g in (PerTensor(), PerChannel(), PerToken(), PerGroup(2)))


def test_per_channel_default_axis_is_output_channels():
    assert PerChannel() == PerChannel(0)


def test_group_size_must_be_an_int():
    with pytest.raises(ValueError, match="PerGroup\\(group_size\\) needs a positive int, got 64.0"):
        PerGroup(64.0)


def test_check_rejects_a_group_size_that_does_not_divide():
    with pytest.raises(ValueError, match="does not divide the last dimension \\(10\\)"):
        PerGroup(4).check(torch.randn(3, 10))


def test_check_rejects_a_missing_axis():
    with pytest.raises(ValueError, match="PerChannel\\(axis=-3\\) needs a tensor with that axis"):
        PerChannel(-3).check(torch.randn(3, 10))
