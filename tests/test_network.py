"""The CE2P network: checkpoint contract, shapes, and the InPlace-ABN inference formula."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import DATA
from schp.networks import InPlaceABN, build_ce2p, fold_abn
from schp.networks.ce2p import conv1x1_of_parts, conv3x3_of_upsampled, interpolation_matrix

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


# ----------------------------------------------- convolutions over upsampled maps, at the maps' own size
@pytest.mark.parametrize("out_len, in_len", [(32, 1), (32, 2), (32, 3), (32, 6), (60, 6), (119, 60), (128, 32),
                                             (30, 6), (7, 6), (1, 1)])
def test_interpolation_matrix_is_bilinear_with_aligned_corners(out_len, in_len):
    v = torch.randn(2, 3, in_len, 5, generator=torch.Generator().manual_seed(out_len * 100 + in_len))
    expected = F.interpolate(v, size=(out_len, 5), mode="bilinear", align_corners=True)
    torch.testing.assert_close(interpolation_matrix(out_len, in_len, v) @ v, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("small, size", [((1, 1), (32, 32)), ((6, 6), (32, 32)), ((3, 2), (17, 30)), ((6, 6), (60, 60))])
def test_convolutions_over_upsampled_maps_equal_the_released_order(small, size):
    """Upsample-then-convolve (the released network) = convolve-then-upsample (ours), values and gradients."""
    g = torch.Generator().manual_seed(sum(small) + sum(size))
    x = torch.randn(2, 16, *small, generator=g).requires_grad_()
    big = torch.randn(2, 8, *size, generator=g).requires_grad_()
    w3 = torch.randn(12, 16, 3, 3, generator=g).requires_grad_()
    literal = F.conv2d(F.interpolate(x, size=size, mode="bilinear", align_corners=True), w3, padding=1)
    ours = conv3x3_of_upsampled(x, w3, size)
    torch.testing.assert_close(ours, literal, rtol=1e-5, atol=1e-5)
    weights = literal.detach().sin()
    for got, ref in zip(torch.autograd.grad((ours * weights).sum(), (x, w3)),
                        torch.autograd.grad((literal * weights).sum(), (x, w3))):
        # each gradient sums up to 2 x 32 x 32 x 12 x 9 products in fp32, in an order that depends on the
        # CPU's kernels: 1.8e-5 relative on AVX2, under 1e-5 on AVX-512; a wrong gradient is off by O(1)
        assert (got - ref).norm() <= 1e-4 * ref.norm()

    conv = torch.nn.Conv2d(24, 10, kernel_size=1, bias=True)
    literal = conv(torch.cat([big, F.interpolate(x, size=size, mode="bilinear", align_corners=True)], 1))
    ours = conv1x1_of_parts(conv, [(big, False), (x, True)], size)
    torch.testing.assert_close(ours, literal, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dataset, size", [("pascal", (64, 64)), ("lip", (97, 131))])
def test_network_equals_the_transliterated_original(dataset, size, checkpoints):
    """All three heads against tests/original_pipeline.py's network (concatenations as released),
    unfolded and folded, at sizes where the pyramid bins overlap."""
    from original_pipeline import load_model
    from schp.checkpoint import read_state_dict

    path = checkpoints(dataset)
    original = load_model(str(path), NUM_CLASSES[dataset])
    model = build_ce2p(NUM_CLASSES[dataset])
    model.load_state_dict(read_state_dict(path))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        (parsing, fusion), (edge,) = original(x)
        for net in (model, fold_abn(copy.deepcopy(model))):
            got = net(x)
            for name, ref in (("parsing", parsing), ("fusion", fusion), ("edge", edge)):
                value = getattr(got, name)
                assert (value - ref).abs().max() <= 1e-4 * ref.abs().max(), name
                assert (value.argmax(1) == ref.argmax(1)).double().mean() >= 0.9999, name


def test_the_reordered_network_does_fewer_flops_than_the_released_one():
    """The FLOPs docs/performance.md quotes: 174.6 GFLOP per 512 x 512 pascal image for the released network
    (its transliteration), 150.0 for ours; counted on meta tensors, so nothing runs."""
    from torch.utils.flop_counter import FlopCounterMode
    from original_pipeline import ResNet

    counts = []
    with torch.device("meta"):
        for model in (ResNet(num_classes=7).eval(), build_ce2p(7)):
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(torch.zeros(1, 3, 512, 512))
            counts.append(counter.get_total_flops() / 1e9)
    assert counts[0] == pytest.approx(174.6, abs=0.05)
    assert counts[1] == pytest.approx(150.0, abs=0.05)
