"""Training pieces against direct formulas: loss terms, edge targets, schedule, augmentation, InPlace-ABN
in training mode, SCHP aggregation and batch-norm re-estimation. No ResNet here: these run in seconds."""
import random

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from schp.data.augment import LEGACY_LIP_PAIRS, augment, edge_target, flip_lookup
from schp.networks import InPlaceABN
from schp.training.losses import (SCHPLoss, cross_entropy, edge_loss, kl_mean, lovasz_softmax)
from schp.training.schedule import is_cycle_end, learning_rate
from schp.training.self_correction import aggregate_parameters, reestimate_bn
from schp.utils.transforms import get_affine_transform


def labels_with_ignore(b=2, c=5, h=9, w=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (b, h, w), generator=g)
    y[:, 0, :3] = 255
    y[1, -2:, -4:] = 255
    return y


# ---------------------------------------------------------------- direct (loop) implementations

def edge_direct(label: np.ndarray) -> np.ndarray:
    h, w = label.shape
    e = np.zeros((h, w), np.float32)

    def valid(a, b):
        return a != 255 and b != 255
    for y in range(h):
        for x in range(w):
            v = label[y, x]
            if y >= 1 and v != label[y - 1, x] and valid(v, label[y - 1, x]):
                e[y, x] = 1
            if x <= w - 2 and v != label[y, x + 1] and valid(v, label[y, x + 1]):
                e[y, x] = 1
            if y <= h - 2 and x <= w - 2 and v != label[y + 1, x + 1] and valid(v, label[y + 1, x + 1]):
                e[y, x] = 1
            if y <= h - 2 and x >= 1 and v != label[y + 1, x - 1] and valid(v, label[y + 1, x - 1]):
                e[y, x] = 1
    out = np.zeros_like(e)
    for y in range(h):
        for x in range(w):
            out[y, x] = float(e[max(0, y - 1):y + 2, max(0, x - 1):x + 2].any())
    return out


def lovasz_direct(logits: torch.Tensor, labels: torch.Tensor) -> float:
    p = torch.softmax(logits.double(), 1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).numpy()
    y = labels.reshape(-1).numpy()
    keep = y != 255
    p, y = p[keep], y[keep]
    losses = []
    for c in sorted(set(y.tolist())):
        f = (y == c).astype(np.float64)
        err = np.abs(f - p[:, c])
        order = np.argsort(-err, kind="stable")
        err, f = err[order], f[order]
        g = f.sum()
        inter = g - np.cumsum(f)
        union = g + np.cumsum(1 - f)
        jac = 1 - inter / union
        grad = np.concatenate([jac[:1], jac[1:] - jac[:-1]])
        losses.append(float(np.dot(err, grad)))
    return float(np.mean(losses)) if losses else 0.0


def ce_direct(logits, labels):
    logp = torch.log_softmax(logits.double(), 1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    y = labels.reshape(-1)
    keep = y != 255
    return float(-logp[keep, y[keep]].mean())


def kl_direct(x, t, mask):
    c = x.shape[1]
    q = torch.log_softmax(x.double(), 1).permute(0, 2, 3, 1).reshape(-1, c)[mask.reshape(-1)]
    pt = torch.softmax(t.double(), 1).permute(0, 2, 3, 1).reshape(-1, c)[mask.reshape(-1)]
    return float((pt * (pt.log() - q)).sum() / (q.shape[0] * c))


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


# ---------------------------------------------------------------- tests

def test_edge_target_equals_the_loop_definition():
    y = labels_with_ignore(h=12, w=13)
    y[0, 4:8, 4:9] = 3  # a block so that not every pixel is an edge
    got = edge_target(y)
    for b in range(y.shape[0]):
        np.testing.assert_array_equal(got[b].numpy(), edge_direct(y[b].numpy()))
    assert set(torch.unique(got).tolist()) <= {0.0, 1.0}


def test_cross_entropy_and_lovasz_against_direct_formulas():
    y = labels_with_ignore()
    x = torch.randn(2, 5, 9, 11, generator=torch.Generator().manual_seed(1))
    assert float(cross_entropy(x, y)) == pytest.approx(ce_direct(x, y), rel=1e-5)
    assert float(lovasz_softmax(x, y)) == pytest.approx(lovasz_direct(x, y), rel=1e-5)
    assert float(lovasz_softmax(x, torch.full_like(y, 255))) == 0.0
    assert float(cross_entropy(x, torch.full_like(y, 255))) == 0.0  # released: NaN


def test_edge_loss_is_the_class_balanced_mean_and_zero_without_edges():
    x = torch.randn(2, 2, 6, 7, generator=torch.Generator().manual_seed(2))
    e = (torch.rand(2, 6, 7, generator=torch.Generator().manual_seed(3)) > 0.7).float()
    nll = -torch.log_softmax(x.double(), 1)
    on_edge = nll[:, 1][e == 1].mean()
    off_edge = nll[:, 0][e == 0].mean()
    assert float(edge_loss(x, e)) == pytest.approx(float(0.5 * (on_edge + off_edge)), rel=1e-5)
    assert float(edge_loss(x, torch.zeros_like(e))) == 0.0  # released: 0/0 = NaN


def test_kl_is_the_legacy_mean_over_pixels_and_classes():
    x = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(4))
    t = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(5))
    y = labels_with_ignore(h=4, w=4)
    assert float(kl_mean(x, t, y)) == pytest.approx(kl_direct(x, t, y != 255), rel=1e-5)
    per_pixel = kl_direct(x, t, y != 255) * 5
    assert float(kl_mean(x, t, y)) == pytest.approx(per_pixel / 5, rel=1e-5)  # 1/C of a per-pixel KL


def network_outputs(c=5, size=(5, 6), seed=6):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, k, *size, generator=g) for k in (c, c, 2))


@pytest.mark.parametrize("fix_ignore", [False, True])
def test_self_correction_phase_with_and_without_the_label_mutation(fix_ignore):
    y = labels_with_ignore()
    e = edge_target(y)
    parsing, fusion, edge = network_outputs()
    g = torch.Generator().manual_seed(7)
    soft = (torch.randn(2, 5, 5, 6, generator=g), torch.randn(2, 2, 5, 6, generator=g))
    cycle_n = 2
    a = 1 / 3
    loss = SCHPLoss(1.0, 1.0, 0.1, fix_ignore=fix_ignore)
    total, terms = loss((parsing, fusion, edge), y.clone(), e, cycle_n, soft)

    size = y.shape[-2:]
    P, Fu, E = up(parsing, size), up(fusion, size), up(edge, size)
    zs, zes = up(soft[0], size), up(soft[1], size)
    mutated = y.clone()
    mutated[mutated == 255] = 0  # what the released to_one_hot did to the label tensor
    y_after = y if fix_ignore else mutated
    mask = (y != 255) if fix_ignore else torch.ones_like(y, dtype=torch.bool)
    onehot = F.one_hot(mutated, 5).permute(0, 3, 1, 2).double()
    target = (1 - a) * zs.double() + a * onehot
    edge_target_soft = (1 - a) * zes.double() + a * F.one_hot(e.long(), 2).permute(0, 3, 1, 2).double()
    expect_parsing = 0.5 * (lovasz_direct(P, y) + kl_direct(P, target, mask))
    expect_fusion = 0.5 * (lovasz_direct(Fu, y_after) + kl_direct(Fu, target, mask))
    expect_edge = kl_direct(E, edge_target_soft, mask)
    assert float(terms["parsing"]) == pytest.approx(expect_parsing, rel=1e-5)
    assert float(terms["fusion"]) == pytest.approx(expect_fusion, rel=1e-5)
    assert float(terms["edge"]) == pytest.approx(expect_edge, rel=1e-5)
    assert float(terms["consistency"]) == 0.0
    assert float(total) == pytest.approx(expect_parsing + expect_fusion + expect_edge, rel=1e-5)
    if not fix_ignore:  # the mutation changes the numbers: the fusion Lovasz sees ignored pixels as class 0
        assert lovasz_direct(Fu, y_after) != pytest.approx(lovasz_direct(Fu, y), rel=1e-6)


def test_hard_label_phase_total():
    y = labels_with_ignore()
    e = edge_target(y)
    parsing, fusion, edge = network_outputs(seed=8)
    total, terms = SCHPLoss(1.0, 0.5, 0.1)((parsing, fusion, edge), y, e, 0)
    size = y.shape[-2:]
    expect = sum(0.5 * (lovasz_direct(up(o, size), y) + ce_direct(up(o, size), y)) for o in (parsing, fusion))
    nll = -torch.log_softmax(up(edge, size).double(), 1)
    expect += 0.5 * 0.5 * float(nll[:, 1][e == 1].mean() + nll[:, 0][e == 0].mean())
    assert float(total) == pytest.approx(expect, rel=1e-5)
    assert torch.equal(y, labels_with_ignore())  # labels untouched


TABLE = {0: 7.0e-5, 5: 3.535e-3, 9: 6.307e-3, 10: 7.0e-3, 50: 4.136691e-3, 99: 7.211078e-5, 100: 3.5e-3,
         105: 1.785e-3, 109: 1.539381e-4, 110: 3.5e-3, 149: 1.539381e-4}


@pytest.mark.parametrize("epoch", sorted(TABLE))
def test_schedule_matches_the_released_table(epoch):
    assert learning_rate(epoch, 7e-3) == pytest.approx(TABLE[epoch], rel=1e-6, abs=1e-9)


def test_cycle_ends_of_the_released_defaults():
    assert [e + 1 for e in range(150) if is_cycle_end(e, 100, 10)] == [100, 110, 120, 130, 140, 150]


def test_rotated_affine_equals_rotation_matrix_and_positive_turns_counter_clockwise():
    center, scale, size = np.array([40.5, 30.0], np.float32), np.array([81.0, 81.0], np.float32), (64, 64)
    m = get_affine_transform(center, scale, size, rotation=25.0)
    k = 63 / 81.0
    ref = cv2.getRotationMatrix2D((40.5, 30.0), 25.0, k)
    ref[:, 2] += np.array([31.5, 31.5]) - np.array([40.5, 30.0])
    np.testing.assert_allclose(m, ref, atol=1e-4)
    # a point to the right of the centre goes up on screen (counter-clockwise)
    x, y = m @ np.array([50.5, 30.0, 1.0])
    assert y < 31.5
    assert np.array_equal(get_affine_transform(center, scale, size, rotation=0.0),
                          get_affine_transform(center, scale, size))


def test_flip_exchanges_the_dataset_pairs_and_the_border_is_ignore():
    image = np.zeros((40, 40, 3), np.uint8)
    label = np.zeros((40, 40), np.uint8)
    label[:, :10] = 9  # left shoe (ATR) on the left
    label[:, 30:] = 10
    atr_pairs = ((9, 10), (12, 13), (14, 15))

    class Always:  # gates: no rotation (first draw), mirror (second)
        def __init__(self):
            self.values = iter([0.9, 0.1])

        def random(self):
            return next(self.values)

    rng = np.random.default_rng(0)
    _, flipped = augment(image, label, (40, 40), rng, Always(), atr_pairs, scale_factor=0.0)
    assert (flipped[20, :5] == 9).all() and (flipped[20, -5:] == 10).all()  # mirrored, then swapped back
    assert flip_lookup(LEGACY_LIP_PAIRS)[9] == 9 and flip_lookup(LEGACY_LIP_PAIRS)[16] == 17
    rng = np.random.default_rng(1)
    _, zoomed_out = augment(image, label, (40, 40), rng, random.Random(5), atr_pairs, scale_factor=0.0,
                            rotation_prob=1.0, flip_prob=0.0, rotation_factor=30)
    assert (zoomed_out == 255).any()  # rotated: corners outside the image are ignored


def test_inplace_abn_training_mode_formula_and_running_update():
    torch.manual_seed(0)
    abn = InPlaceABN(3).train()
    with torch.no_grad():
        abn.weight.copy_(torch.tensor([-2.0, 0.5, 1.0]))
        abn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.randn(4, 3, 5, 6) * 2 + 1
    y = abn(x)
    mu = x.mean((0, 2, 3))
    var = x.var((0, 2, 3), unbiased=False)
    ref = (x - mu[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) \
        * (abn.weight.abs() + 1e-5)[:, None, None] + abn.bias[:, None, None]
    torch.testing.assert_close(y, F.leaky_relu(ref, 0.01), rtol=1e-5, atol=1e-5)
    n = 4 * 5 * 6
    torch.testing.assert_close(abn.running_mean, 0.1 * mu)
    torch.testing.assert_close(abn.running_var, 0.9 + 0.1 * var * n / (n - 1))
    y.sum().backward()
    assert torch.isfinite(abn.weight.grad).all()


def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), InPlaceABN(4), nn.Conv2d(4, 5, 1),
                         InPlaceABN(5, activation="identity"))


def test_aggregation_is_the_plain_mean_of_the_snapshots():
    torch.manual_seed(0)
    schp = small_net()
    snapshots = [small_net() for _ in range(4)]
    for cycle_n, snap in enumerate(snapshots):
        aggregate_parameters(schp, snap, cycle_n)
    for name, p in schp.named_parameters():
        mean = torch.stack([dict(s.named_parameters())[name] for s in snapshots]).mean(0)
        torch.testing.assert_close(p, mean, rtol=1e-6, atol=1e-6)


def test_bn_reestimation_is_the_cumulative_mean_over_the_loader():
    torch.manual_seed(0)
    net = small_net()
    batches = [torch.randn(3, 3, 6, 6) * (i + 1) + i for i in range(4)]
    seen = reestimate_bn(net, batches, torch.device("cpu"))
    assert seen == 12 and all(m.momentum == 0.1 for m in net if isinstance(m, InPlaceABN))
    conv1, abn1, conv2, abn2 = net
    stats = {1: [], 3: []}
    with torch.no_grad():
        for x in batches:
            h = conv1(x)
            stats[1].append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)))
            mu, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
            h = F.leaky_relu((h - mu[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5)
                             * (abn1.weight.abs() + 1e-5)[:, None, None] + abn1.bias[:, None, None], 0.01)
            h = conv2(h)
            stats[3].append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)))
    for index, layer in ((1, abn1), (3, abn2)):
        torch.testing.assert_close(layer.running_mean, torch.stack([s[0] for s in stats[index]]).mean(0),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var, torch.stack([s[1] for s in stats[index]]).mean(0),
                                   rtol=1e-5, atol=1e-5)


def _sync_bn_worker(rank, world, port, x_full, folder):
    import os
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        abn = InPlaceABN(3).train()
        abn.sync_group = "world"
        with torch.no_grad():
            abn.weight.copy_(torch.tensor([-2.0, 0.5, 1.0]))
        x = x_full[rank * 2:(rank + 1) * 2].clone().requires_grad_()
        y = abn(x)
        (y * torch.arange(y.numel()).reshape(y.shape).float().sin()[:]).sum().backward()
        torch.save({"y": y.detach(), "dx": x.grad, "dw": abn.weight.grad, "rm": abn.running_mean,
                    "rv": abn.running_var}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_bn_over_two_gloo_processes_equals_one_big_batch(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x_full = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mp.spawn(_sync_bn_worker, args=(2, port, x_full, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    abn = InPlaceABN(3).train()
    with torch.no_grad():
        abn.weight.copy_(torch.tensor([-2.0, 0.5, 1.0]))
    x = x_full.clone().requires_grad_()
    y = abn(x)
    weights = torch.cat([torch.arange(y[:2].numel()).reshape(y[:2].shape).float().sin()] * 2)
    (y * weights).sum().backward()
    for r in range(2):
        torch.testing.assert_close(got[r]["y"], y[r * 2:(r + 1) * 2].detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[r]["dx"], x.grad[r * 2:(r + 1) * 2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[r]["rm"], abn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[r]["rv"], abn.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0]["dw"] + got[1]["dw"], abn.weight.grad, rtol=1e-4, atol=1e-4)


def test_init_from_a_released_checkpoint_reinitialises_only_the_heads(checkpoints):
    from schp.networks import CE2P
    from schp.checkpoint import read_state_dict
    from schp.training.trainer import load_init

    torch.manual_seed(0)
    model = CE2P(4)
    fresh_head = model.fushion[3].weight.detach().clone()
    heads = load_init(model, checkpoints("pascal"))
    assert heads == ["decoder.conv4", "fushion.3"]
    released = read_state_dict(checkpoints("pascal"))
    state = model.state_dict()
    assert torch.equal(state["layer3.7.conv2.weight"], released["layer3.7.conv2.weight"])
    assert torch.equal(state["fushion.0.weight"], released["fushion.0.weight"])
    assert torch.equal(state["fushion.3.weight"], fresh_head) and state["fushion.3.weight"].shape[0] == 4


def test_imagenet_backbone_loading_rules(tmp_path):
    from schp.networks import CE2P
    from schp.networks.imagenet import PretrainedWeightsError, load_imagenet

    torch.manual_seed(1)
    donor = CE2P(7).state_dict()
    backbone = {k: v.clone() for k, v in donor.items() if k.startswith(("conv", "bn", "layer"))}
    file = dict(backbone, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000),
                             "bn1.num_batches_tracked": torch.tensor(5)})
    torch.save(file, tmp_path / "resnet101-imagenet.pth")
    torch.manual_seed(2)
    model = CE2P(7)
    head = model.decoder.conv4.weight.detach().clone()
    load_import = load_imagenet(model, tmp_path / "resnet101-imagenet.pth")
    assert load_import is None
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in backbone.items())
    assert torch.equal(state["decoder.conv4.weight"], head)  # decoder keeps its own init
    del file["layer4.2.conv3.weight"]
    torch.save(file, tmp_path / "partial.pth")
    with pytest.raises(PretrainedWeightsError, match="1 missing.*layer4.2.conv3.weight"):
        load_imagenet(model, tmp_path / "partial.pth")
    with pytest.raises(PretrainedWeightsError, match="pretrained=.*absent.pth.*no such file.*resnet101-imagenet"):
        load_imagenet(model, tmp_path / "absent.pth")


def test_train_py_names_its_flag_and_the_way_without_a_backbone(tmp_path, capsys):
    from schp.commands import train
    from tiny_parsing_data import make_dataset

    data = make_dataset(tmp_path / "data", 4, train=2)
    absent = tmp_path / "absent.pth"
    code = train.main(["--dataset", "custom", "--num-classes", "4", "--data-dir", str(data), "--log-dir",
                       str(tmp_path / "log"), "--imagenet-pretrain", str(absent), "--input-size", "64,64",
                       "--batch-size", "2", "--num-workers", "0", "--quiet"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert last.startswith(f"error: --imagenet-pretrain {absent}: no such file; get the deep-stem ResNet-101")
    assert last.endswith("or pass --imagenet-pretrain none to train from scratch")
