"""CE2P human parser on a deep-stem ResNet-101, as released with Self-Correction for Human Parsing.

Re-implemented from the published SCHP code (networks/AugmentCE2P.py) in plain PyTorch: the attribute
names below are the checkpoint's keys (after the DataParallel `module.` prefix), so the released files
load strictly. InPlace-ABN is written with plain PyTorch operations (no CUDA extension), for inference
and training alike.
"""
from typing import List, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn


class InPlaceABN(nn.Module):
    """InPlace-ABN: batch norm, then an optional leaky ReLU.

    y = (x - running_mean) * rsqrt(running_var + eps) * (|weight| + eps) + bias, eps = 1e-5.
    The `|weight| + eps` is what the InPlace-ABN library computes (it keeps scales positive so the
    activation stays invertible); a plain BatchNorm port is wrong for every negative scale.
    Holds exactly the four checkpoint tensors `weight, bias, running_mean, running_var`.
    In training mode it normalises with the batch's statistics and updates the running ones with
    `momentum` (0.1; the unbiased variance), as the library's training kernels do.

    Shapes: N x C x H x W -> N x C x H x W.
    """

    def __init__(self, num_features: int, activation: str = "leaky_relu", slope: float = 0.01,
                 eps: float = 1e-5):
        super().__init__()
        if activation not in ("leaky_relu", "identity"):
            raise ValueError(f"unknown activation {activation!r}")
        self.activation = activation
        self.slope = slope
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.momentum = 0.1  # of the running statistics in training mode
        self.sync_group = None  # "world" (or a process group): synchronised statistics under DDP

    def scale_shift(self):
        """Per-channel (scale, shift) such that the normalisation is `x * scale + shift`."""
        scale = torch.rsqrt(self.running_var + self.eps) * (self.weight.abs() + self.eps)
        return scale, self.bias - self.running_mean * scale

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, self.slope)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.activate(self._train_norm(x))
        scale = torch.rsqrt(self.running_var + self.eps) * (self.weight.abs() + self.eps)
        x = (x - self.running_mean[:, None, None]) * scale[:, None, None] + self.bias[:, None, None]
        return self.activate(x)

    def _train_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Batch statistics (biased variance for the output, unbiased for the running update), as the
        InPlace-ABN library trains; the gradient flows through mean and variance. With `sync_group`
        set (and torch.distributed initialised) the statistics are those of the whole global batch."""
        weight = self.weight.abs() + self.eps
        if self.sync_group is not None and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            return _sync_batch_norm(x, weight, self.bias, self.running_mean, self.running_var,
                                    self.momentum, self.eps, self.sync_group)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, self.bias, training=True,
                            momentum=self.momentum, eps=self.eps)


class _AllReduceSum(torch.autograd.Function):
    """Sum over all ranks; the gradient of a sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _sync_batch_norm(x, weight, bias, running_mean, running_var, momentum, eps, group):
    """Batch norm over the batches of all ranks: autograd-aware all-reduce of per-channel sums."""
    dims = (0, 2, 3)
    dtype, x = x.dtype, x.float()  # statistics in fp32 also under autocast
    local_n = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
    stats = torch.cat([x.sum(dims), (x * x).sum(dims), local_n])
    stats = _AllReduceSum.apply(stats, None if group == "world" else group)
    c = x.shape[1]
    n = stats[-1]
    mean = stats[:c] / n
    var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
        running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / (n - 1))
    scale = torch.rsqrt(var + eps) * weight
    return (x * scale[None, :, None, None] + (bias - mean * scale)[None, :, None, None]).to(dtype)


class FoldedABN(nn.Module):
    """What remains of an InPlace-ABN once its affine is folded into the preceding convolution."""

    def __init__(self, activation: str, slope: float):
        super().__init__()
        self.activation = activation
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, self.slope, inplace=True)
        return x


def BackboneNorm(num_features: int) -> InPlaceABN:
    """The backbone's normalisation: InPlace-ABN without activation (a separate ReLU follows)."""
    return InPlaceABN(num_features, activation="identity")


def upsample_like(x: torch.Tensor, size) -> torch.Tensor:
    # align_corners=True everywhere: the released weights were trained with it.
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


# Convolutions over upsampled maps, computed at the maps' own size.
#
# The released network upsamples small maps (the pyramid bins, the decoder's context, two edge
# features) and concatenates them with large ones before a convolution. Upsampling mixes pixels and a
# convolution's kernel mixes channels, both linearly, so each part's share of the kernel can be
# applied first, at the part's own size, and the (few) result channels upsampled after: the same
# arithmetic up to float rounding, with 25 of the 175 GFLOP of a 512 x 512 image and the big
# concatenated maps gone. The weights and their names are unchanged.

def interpolation_matrix(out_len, in_len: int, like: torch.Tensor) -> torch.Tensor:
    """out_len x in_len matrix M with M @ v = F.interpolate(v, out_len, linear, align_corners=True).

    Source positions are computed as F.interpolate computes them (scale (in-1)/(out-1) in float,
    times the output index). `out_len` may be a traced size; `like` gives the device and dtype.
    """
    position = torch.arange(out_len, device=like.device, dtype=torch.float32)
    source = position * ((in_len - 1) / position[-1].clamp(min=1))
    low = source.floor().clamp(max=in_len - 1)
    frac = (source - low)[:, None]
    low = low.long()
    high = (low + 1).clamp(max=in_len - 1)
    index = torch.arange(in_len, device=like.device)
    matrix = (index[None, :] == low[:, None]) * (1 - frac) + (index[None, :] == high[:, None]) * frac
    return matrix.to(like.dtype)


def conv3x3_of_upsampled(x: torch.Tensor, weight: torch.Tensor, size) -> torch.Tensor:
    """F.conv2d(upsample_like(x, size), weight, padding=1), computed at x's size (3x3 kernel, stride 1).

    The kernel's nine taps mix x's channels first (a 1x1 convolution with 9 x out channels); each
    tap's result is then upsampled and shifted by its offset, the zero padding included, in one matrix
    product per axis: rows[y, (i, a)] = M_h[y + i - 1, a], zero where y + i - 1 falls outside.
    Shapes: N x C x k x l, O x C x 3 x 3 -> N x O x h x w.
    """
    n, c, k, l = x.shape
    o = weight.shape[0]
    h, w = size
    taps = F.conv2d(x, weight.permute(0, 2, 3, 1).reshape(o * 9, c, 1, 1))
    taps = taps.reshape(n, o, 3, 3, k, l).permute(0, 1, 2, 4, 3, 5).reshape(n, o, 3 * k, 3 * l)
    rows = F.pad(interpolation_matrix(h, k, taps), (0, 0, 1, 1))
    cols = F.pad(interpolation_matrix(w, l, taps), (0, 0, 1, 1))
    rows = torch.cat([rows[i:i + h] for i in range(3)], dim=1)  # h x 3k
    cols = torch.cat([cols[j:j + w] for j in range(3)], dim=1)  # w x 3l
    return torch.matmul(torch.matmul(rows, taps), cols.t())


def conv1x1_of_parts(conv: nn.Conv2d, parts, size) -> torch.Tensor:
    """conv(torch.cat([p if not up else upsample_like(p, size) for p, up in parts], 1)) for a 1x1 conv,
    with each upsampled part's share of the kernel applied before its upsampling."""
    out, start = None, 0
    for part, upsample in parts:
        stop = start + part.shape[1]
        y = F.conv2d(part, conv.weight[:, start:stop])
        y = upsample_like(y, size) if upsample else y
        out = y if out is None else out + y
        start = stop
    return out if conv.bias is None else out + conv.bias[None, :, None, None]


class Bottleneck(nn.Module):
    """ResNet bottleneck (expansion 4) with dilation; N x inplanes x H x W -> N x 4*planes x H/s x W/s."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = BackboneNorm(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = BackboneNorm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = BackboneNorm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class BinAverage(nn.Module):
    """Adaptive average pooling to `size` x `size` bins, computed as two averaging matrices.

    Bin i of a length-L axis covers [floor(i*L/o), ceil((i+1)*L/o)), exactly as AdaptiveAvgPool2d
    (bins overlap when o does not divide L); y = A_h @ x @ A_w^T with A's rows holding 1/len on the
    bin. Unlike AdaptiveAvgPool2d this exports to ONNX at every input size (the exporters refuse or
    approximate non-dividing sizes, e.g. 6 bins of the 32 x 32 map of a 512 x 512 input). The
    matrices are built from the input's shape on each call: no keys, nothing in the state dict.

    Shapes: N x C x H x W -> N x C x size x size.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def matrix(self, length, like: torch.Tensor) -> torch.Tensor:
        """size x length averaging matrix of one axis (`length` may be a traced/symbolic size)."""
        bins = torch.arange(self.size, device=like.device)
        start = torch.div(bins * length, self.size, rounding_mode="floor")
        stop = torch.div((bins + 1) * length + self.size - 1, self.size, rounding_mode="floor")
        index = torch.arange(length, device=like.device)
        inside = (index[None, :] >= start[:, None]) & (index[None, :] < stop[:, None])
        weights = inside.to(like.dtype)
        return weights / weights.sum(1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.matrix(x.shape[2], x)
        cols = self.matrix(x.shape[3], x)
        return torch.matmul(torch.matmul(rows, x), cols.t())


class PSPModule(nn.Module):
    """Pyramid pooling (sizes 1, 2, 3, 6) on x5; N x 2048 x h x w -> N x 512 x h x w."""

    def __init__(self, features: int = 2048, out_features: int = 512, sizes=(1, 2, 3, 6)):
        super().__init__()
        # stages.i = [pool, conv, ABN]: the pool has no keys but keeps conv at .1 and ABN at .2;
        # BinAverage is AdaptiveAvgPool2d's exact equivalent that also exports at any size
        self.stages = nn.ModuleList([
            nn.Sequential(BinAverage(size),
                          nn.Conv2d(features, out_features, kernel_size=1, bias=False),
                          InPlaceABN(out_features))
            for size in sizes])
        self.bottleneck = nn.Sequential(
            nn.Conv2d(features + len(sizes) * out_features, out_features, kernel_size=3, padding=1,
                      bias=False),
            InPlaceABN(out_features))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        # On the CPU, oneDNN picks other kernels for the 1x1 convolutions on the pooled 1x1..6x6 maps
        # when they hold N samples instead of one, which moved logits by up to 3e-5 and flipped pixels
        # at near-ties between batch sizes. One sample at a time (the same operations in N calls)
        # makes a batch's maps equal, bit for bit, those of one image per forward pass. A traced or
        # exported graph keeps the batched form (its runtime chooses its own kernels anyway), and so
        # does training, whose batch norm takes its statistics over the whole batch.
        if (feats.shape[0] > 1 and not self.training and feats.device.type == "cpu"
                and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()):
            return torch.cat([self._forward(feats[i:i + 1]) for i in range(feats.shape[0])])
        return self._forward(feats)

    def _forward(self, feats: torch.Tensor) -> torch.Tensor:
        # = self.bottleneck(torch.cat([upsample_like(stage(feats), size) for stage in stages] + [feats]))
        conv, size = self.bottleneck[0], feats.shape[2:]
        priors = conv.weight.shape[1] - feats.shape[1]
        out = F.conv2d(feats, conv.weight[:, priors:], conv.bias, padding=1)
        width = priors // len(self.stages)
        for i, stage in enumerate(self.stages):
            out = out + conv3x3_of_upsampled(stage(feats), conv.weight[:, i * width:(i + 1) * width], size)
        return self.bottleneck[1:](out)


def conv_abn(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 convolution + InPlace-ABN with leaky ReLU (keys `.0.weight`, `.1.*`)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                         InPlaceABN(out_channels))


class EdgeModule(nn.Module):
    """Edge branch on x2, x3, x4. Returns (edge logits N x 2 x H2 x W2, edge features N x 768 x H2 x W2)."""

    def __init__(self, in_fea=(256, 512, 1024), mid_fea: int = 256, out_fea: int = 2):
        super().__init__()
        self.conv1 = conv_abn(in_fea[0], mid_fea)
        self.conv2 = conv_abn(in_fea[1], mid_fea)
        self.conv3 = conv_abn(in_fea[2], mid_fea)
        self.conv4 = nn.Conv2d(mid_fea, out_fea, kernel_size=3, padding=1, bias=True)  # shared
        self.conv5 = nn.Conv2d(out_fea * 3, out_fea, kernel_size=1, bias=True)

    def forward(self, x2: torch.Tensor, x3: torch.Tensor, x4: torch.Tensor):
        """(edge logits, [fea1, fea2, fea3]): the features at their own sizes; the released code
        upsamples fea2 and fea3 to x2's size and concatenates them, which CE2P.forward does in effect."""
        size = x2.shape[2:]
        fea1, fea2, fea3 = self.conv1(x2), self.conv2(x3), self.conv3(x4)
        edge1, edge2, edge3 = self.conv4(fea1), self.conv4(fea2), self.conv4(fea3)
        edge2, edge3 = upsample_like(edge2, size), upsample_like(edge3, size)
        edge = self.conv5(torch.cat([edge1, edge2, edge3], dim=1))
        return edge, [fea1, fea2, fea3]


class DecoderModule(nn.Module):
    """Parsing decoder on (psp, x2). Returns (parsing logits N x C x H2 x W2, features N x 256 x H2 x W2)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = conv_abn(512, 256)
        self.conv2 = conv_abn(256, 48)
        self.conv3 = nn.Sequential(
            nn.Conv2d(304, 256, kernel_size=1, bias=False), InPlaceABN(256),
            nn.Conv2d(256, 256, kernel_size=1, bias=False), InPlaceABN(256))
        self.conv4 = nn.Conv2d(256, num_classes, kernel_size=1, bias=True)

    def forward(self, psp: torch.Tensor, x2: torch.Tensor):
        # = self.conv3(torch.cat([upsample_like(self.conv1(psp), x2's size), self.conv2(x2)], dim=1))
        fea = conv1x1_of_parts(self.conv3[0], [(self.conv1(psp), True), (self.conv2(x2), False)],
                               x2.shape[2:])
        fea = self.conv3[1:](fea)
        return self.conv4(fea), fea


class CE2POutput(NamedTuple):
    """The three heads, each at 1/4 of the input size: N x C, N x C, N x 2."""
    parsing: torch.Tensor
    fusion: torch.Tensor  # what the extractor uses
    edge: torch.Tensor


class CE2P(nn.Module):
    """CE2P: deep-stem ResNet-101 (output stride 16), PSP context, decoder, edge branch and fusion.

    Input N x 3 x H x W (BGR, normalised); output `CE2POutput`, each N x ? x ceil(H/4) x ceil(W/4).
    """

    def __init__(self, num_classes: int, layers=(3, 4, 23, 3)):
        super().__init__()
        self.inplanes = 128
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = BackboneNorm(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, padding=1, bias=False)
        self.bn2 = BackboneNorm(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3, padding=1, bias=False)
        self.bn3 = BackboneNorm(128)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], dilation=2)
        self.context_encoding = PSPModule(2048, 512)
        self.edge = EdgeModule()
        self.decoder = DecoderModule(num_classes)
        # "fushion" (sic): the released checkpoints spell it so. [2] is a key-less Dropout2d.
        self.fushion = nn.Sequential(
            nn.Conv2d(1024, 256, kernel_size=1, bias=False), InPlaceABN(256), nn.Dropout2d(0.1),
            nn.Conv2d(256, num_classes, kernel_size=1, bias=True))

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride,
                          bias=False),
                BackboneNorm(planes * Bottleneck.expansion))
        layers: List[nn.Module] = [Bottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> CE2POutput:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x2 = self.layer1(self.maxpool(x))
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        x5 = self.layer4(x4)
        parsing, parsing_fea = self.decoder(self.context_encoding(x5), x2)
        edge, (fea1, fea2, fea3) = self.edge(x2, x3, x4)
        # = self.fushion(torch.cat([parsing_fea, fea1, fea2 and fea3 upsampled to x2's size], dim=1))
        fused = conv1x1_of_parts(self.fushion[0], [(parsing_fea, False), (fea1, False), (fea2, True),
                                                   (fea3, True)], x2.shape[2:])
        fusion = self.fushion[1:](fused)
        return CE2POutput(parsing, fusion, edge)


def build_ce2p(num_classes: int) -> CE2P:
    """The released SCHP architecture (CE2P, ResNet-101) in eval mode, with `num_classes` outputs."""
    return CE2P(num_classes).eval()


def folded_ce2p(num_classes: int, state_dict: Mapping[str, torch.Tensor]) -> CE2P:
    """CE2P with `state_dict` loaded (strict) and InPlace-ABN folded, on the CPU in fp32, for inference.

    Built on the meta device and given copies of the weights (folding scales them in place; the
    caller's tensors stay as they were): no random initialisation of 66.8 M values, and no
    `to_empty`, whose meta-tensor path imports sympy (about 0.5 s of every command's start-up).
    """
    with torch.device("meta"):
        model = build_ce2p(num_classes)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    copies = {k: v.detach().to(dtype=dtypes.get(k, v.dtype), copy=True, memory_format=torch.contiguous_format)
              for k, v in state_dict.items()}
    model.load_state_dict(copies, strict=True, assign=True)
    return fold_abn(model).eval()


@torch.no_grad()
def fold_abn(model: nn.Module) -> nn.Module:
    """Fold every InPlace-ABN affine into the convolution before it, in place, for faster inference.

    Each (Conv2d, InPlaceABN) pair becomes a biased Conv2d followed by the bare activation; the
    arithmetic is the same up to float rounding (the scale multiplies the kernel instead of the output).
    Run after the checkpoint is loaded: the folded model no longer has the checkpoint's keys.
    """
    def fold(conv: nn.Conv2d, abn: InPlaceABN) -> FoldedABN:
        scale, shift = abn.scale_shift()
        conv.weight.mul_(scale[:, None, None, None])
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.clone())
        return FoldedABN(abn.activation, abn.slope)

    # Every ABN is registered right after its convolution (conv1/bn1, Sequential [0]/[1], ...).
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (abn_name, abn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(abn, InPlaceABN):
                setattr(parent, abn_name, fold(conv, abn))
    leftover = [name for name, m in model.named_modules() if isinstance(m, InPlaceABN)]
    if leftover:
        raise RuntimeError(f"InPlace-ABN layers without a preceding convolution: {leftover}")
    return model
