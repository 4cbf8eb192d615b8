"""The CE2P network: checkpoint contract, shapes, and the InPlace-ABN inference formula."""
import copy
import json

import pytest
import torch

from conftest import DATA
from networks import InPlaceABN, build_ce2p, fold_abn

NUM_CLASSES = {"pascal": 7, "lip": 20, "atr": 18}


@pytest.mark.parametrize("dataset", sorted(NUM_CLASSES))
def test_state_dict_keys_and_shapes_equal_the_released_checkpoint(dataset):
    expected = json.loads((DATA / "state_dict_keys.json").read_text())[dataset]
    got = [[k, list(v.shape)] for k, v in build_ce2p(NUM_CLASSES[dataset]).state_dict().items()]
    assert got == expected
    assert len(got) == 603


def test_parameter_count_is_that_of_the_released_model():
    model = build_ce2p(7)
    assert sum(v.numel() for v in model.state_dict().values()) == pytest.approx(66.8e6, rel=0.01)


@pytest.mark.parametrize("size, classes, out", [(512, 7, 128), (473, 20, 119)])
def test_forward_shapes(size, classes, out):
    with torch.inference_mode():
        result = build_ce2p(classes)(torch.zeros(1, 3, size, size))
    assert result.fusion.shape == (1, classes, out, out)
    assert result.parsing.shape == (1, classes, out, out)
    assert result.edge.shape == (1, 2, out, out)


@pytest.mark.parametrize("activation", ["identity", "leaky_relu"])
def test_inplace_abn_matches_its_formula_with_negative_scales(activation):
    g = torch.Generator().manual_seed(0)
    abn = InPlaceABN(16, activation=activation).eval()  # running statistics (train mode uses the batch)
    with torch.no_grad():
        abn.weight.copy_(torch.randn(16, generator=g))  # about half negative
        abn.bias.copy_(torch.randn(16, generator=g))
        abn.running_mean.copy_(torch.randn(16, generator=g))
        abn.running_var.copy_(torch.rand(16, generator=g) + 0.5)
    assert (abn.weight < 0).sum() >= 4
    x = torch.randn(2, 16, 5, 7, generator=g)
    c = lambda t: t[None, :, None, None]  # noqa: E731
    y = (x - c(abn.running_mean)) * torch.rsqrt(c(abn.running_var) + 1e-5) * (c(abn.weight).abs() + 1e-5) \
        + c(abn.bias)
    if activation == "leaky_relu":
        y = torch.where(y >= 0, y, 0.01 * y)
    torch.testing.assert_close(abn(x), y, rtol=1e-6, atol=1e-6)
    plain_bn = torch.nn.functional.batch_norm(x, abn.running_mean, abn.running_var, abn.weight, abn.bias)
    assert not torch.allclose(abn(x) if activation == "identity" else y, plain_bn, atol=1e-3)


def test_folding_abn_into_convolutions_keeps_the_outputs(checkpoints):
    from schp.checkpoint import read_state_dict

    model = build_ce2p(7)
    model.load_state_dict(read_state_dict(checkpoints("pascal")))
    folded = fold_abn(copy.deepcopy(model))
    assert not any(isinstance(m, InPlaceABN) for m in folded.modules())
    x = torch.randn(1, 3, 128, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = model(x), folded(x)
    for name in ("parsing", "fusion", "edge"):
        ref, got = getattr(a, name), getattr(b, name)
        assert (got - ref).norm() / ref.norm() < 1e-5, name
