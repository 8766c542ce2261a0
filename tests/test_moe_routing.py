"""Public routing surface: moe_task_context / task_ids / current_task_ids / iter_moe_layers / moe_task_state,
and the warning for a multi-task layer run without task ids."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from facelayers.moe import (
    MissingTaskIdsWarning,
    MoEFFN,
    current_task_ids,
    iter_moe_layers,
    moe_task_context,
    moe_task_state,
    named_moe_layers,
)


def _model(num_tasks: int = 2) -> nn.Module:
    torch.manual_seed(0)

    def moe() -> MoEFFN:
        return MoEFFN(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)), 4, num_experts=3, hidden_dim=5,
                      num_tasks=num_tasks)

    return nn.Sequential(nn.Linear(4, 4), moe(), nn.Sequential(moe()))


def test_iterators_and_public_read_of_task_ids():
    model = _model()
    layers = list(iter_moe_layers(model))
    assert [n for n, _ in named_moe_layers(model)] == ["1", "2.0"]
    assert layers == [model[1], model[2][0]]
    assert current_task_ids(model) is None and all(m.task_ids is None for m in layers)
    with moe_task_context(model, torch.tensor([1, 0, 1])):
        ids = current_task_ids(model)
        assert ids.tolist() == [1, 0, 1] and all(m.task_ids is ids for m in layers)
        with moe_task_context(model[2], 0):
            with pytest.raises(ValueError, match=r"hold different task ids \(expected one setting, got 2\)"):
                current_task_ids(model)
            assert int(current_task_ids(model[2])) == 0
        assert current_task_ids(model).tolist() == [1, 0, 1]
    assert current_task_ids(model) is None
    with pytest.raises(ValueError, match=r"contains no MoEFFN layer \(expected a module with MoEFFN layers"):
        current_task_ids(nn.Linear(2, 2))


def test_task_ids_setter_checks_type_and_state_replay():
    model = _model()
    a, b = iter_moe_layers(model)
    with pytest.raises(TypeError, match=r"expected an integer dtype, got dtype torch.float32"):
        a.task_ids = torch.tensor([0.0, 1.0])
    with moe_task_state([a, b], [torch.tensor([1, 1]), None]):
        assert a.task_ids.tolist() == [1, 1] and b.task_ids is None
    assert a.task_ids is None
    with pytest.raises(ValueError, match=r"one task-id setting per layer \(expected 2, got 1\)"):
        with moe_task_state([a, b], [None]):
            pass


def test_context_routes_like_explicit_ids():
    model = _model().eval()
    x = torch.randn(3, 2, 4)
    with moe_task_context(model, [1, 0, 1]):
        ctx = model(x)
    ids = [1, 0, 1]
    direct = model[2][0](model[1](model[0](x), task_ids=ids), task_ids=ids)
    torch.testing.assert_close(ctx, direct, rtol=0, atol=0)
    zero = model[2][0](model[1](model[0](x), task_ids=0), task_ids=0)
    assert not torch.allclose(ctx, zero)


def test_multi_task_without_ids_warns_once_per_layer():
    model = _model().eval()
    x = torch.randn(2, 3, 4)
    with pytest.warns(MissingTaskIdsWarning, match=r"num_tasks=2 ran without task ids") as record:
        model(x)
        model(x)
    assert len([w for w in record if issubclass(w.category, MissingTaskIdsWarning)]) == 2  # two layers, once each
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingTaskIdsWarning)
        model(x)  # already warned
        single = _model(num_tasks=1).eval()
        single(x)  # one task: nothing to warn about
        fresh = _model().eval()
        with moe_task_context(fresh, [0, 1]):
            fresh(x)  # ids given
