"""Test oracle: an independent, deliberately plain transliteration of the released SCHP extractor.

It follows the published code path line by line -- ``simple_extractor.py``,
``datasets/simple_extractor_dataset.py``, ``utils/transforms.py`` (get_affine_transform,
transform_logits) and ``networks/AugmentCE2P.py`` with InPlace-ABN's inference arithmetic -- on the CPU,
one image at a time (see /work/shared/reference/SPEC.md).  It is the reference the project's own
implementation is tested against, so it must stay self-contained: it imports nothing from the project's
``networks``, ``utils`` or ``datasets`` packages, and favours being obviously faithful over being fast.

    labels, logits = run_original("photo.jpg", "pascal.pth", "pascal")
"""
import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATASETS = {  # name: (input size [h, w], number of classes)
    "pascal": ([512, 512], 7),
    "lip": ([473, 473], 20),
    "atr": ([512, 512], 18),
}
MEAN = (0.406, 0.456, 0.485)  # B, G, R (the original feeds OpenCV's BGR array straight through)
STD = (0.225, 0.224, 0.229)


# ----------------------------------------------------------------------------- utils/transforms.py
def get_3rd_point(a, b):
    direct = a - b
    return b + np.array([-direct[1], direct[0]], dtype=np.float32)


def get_dir(src_point, rot_rad):
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    return [src_point[0] * cs - src_point[1] * sn, src_point[0] * sn + src_point[1] * cs]


def get_affine_transform(center, scale, rot, output_size, shift=np.array([0, 0], dtype=np.float32), inv=0):
    src_w = scale[0]
    dst_w, dst_h = output_size[1], output_size[0]
    rot_rad = np.pi * rot / 180
    src_dir = get_dir([0, src_w * -0.5], rot_rad)
    dst_dir = np.array([0, (dst_w - 1) * -0.5], np.float32)
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0, :] = center + scale * shift
    src[1, :] = center + src_dir + scale * shift
    dst[0, :] = [(dst_w - 1) * 0.5, (dst_h - 1) * 0.5]
    dst[1, :] = np.array([(dst_w - 1) * 0.5, (dst_h - 1) * 0.5]) + dst_dir
    src[2:, :] = get_3rd_point(src[0, :], src[1, :])
    dst[2:, :] = get_3rd_point(dst[0, :], dst[1, :])
    if inv:
        return cv2.getAffineTransform(np.float32(dst), np.float32(src))
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def transform_logits(logits, center, scale, width, height, input_size):
    trans = get_affine_transform(center, scale, 0, input_size, inv=1)
    target = [cv2.warpAffine(logits[:, :, i], trans, (int(width), int(height)), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=(0))
              for i in range(logits.shape[2])]
    return np.stack(target, axis=2)


# ----------------------------------------------------------------------------- datasets/simple_extractor_dataset.py
def box2cs(box, aspect_ratio):
    x, y, w, h = box[:4]
    center = np.zeros((2), dtype=np.float32)
    center[0] = x + w * 0.5
    center[1] = y + h * 0.5
    if w > aspect_ratio * h:
        h = w * 1.0 / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    return center, np.array([w, h], dtype=np.float32)


def preprocess(image_path, input_size):
    """-> (1x3xHxW float32 tensor, center, scale, w, h), as SimpleFolderDataset.__getitem__ + DataLoader."""
    img = cv2.imread(image_path, cv2.IMREAD_COLOR)
    if img is None:
        raise IOError(f"cannot read image {image_path}")
    h, w, _ = img.shape
    center, scale = box2cs([0, 0, w - 1, h - 1], input_size[1] * 1.0 / input_size[0])
    trans = get_affine_transform(center, scale, 0, np.asarray(input_size))
    warped = cv2.warpAffine(img, trans, (int(input_size[1]), int(input_size[0])), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    # torchvision ToTensor + Normalize
    x = torch.from_numpy(warped.transpose((2, 0, 1))).contiguous().float().div(255)
    mean = torch.as_tensor(MEAN, dtype=torch.float32)
    std = torch.as_tensor(STD, dtype=torch.float32)
    x.sub_(mean[:, None, None]).div_(std[:, None, None])
    return x.unsqueeze(0), center, scale, w, h


# ----------------------------------------------------------------------------- networks/AugmentCE2P.py
class ABN(nn.Module):
    """InPlaceABN(Sync) at inference: BN with |weight| + eps as scale, then leaky ReLU or nothing."""

    def __init__(self, c, activation="leaky_relu", slope=0.01, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.activation, self.slope, self.eps = activation, slope, eps

    def forward(self, x):
        v = lambda t: t[None, :, None, None]  # noqa: E731
        y = (x - v(self.running_mean)) * v(torch.rsqrt(self.running_var + self.eps)) \
            * v(self.weight.abs() + self.eps) + v(self.bias)
        return F.leaky_relu(y, self.slope) if self.activation == "leaky_relu" else y


def BatchNorm2d(c):  # the original: functools.partial(InPlaceABNSync, activation='none')
    return ABN(c, activation="none")


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, multi_grid=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=dilation * multi_grid,
                               dilation=dilation * multi_grid, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class PSPModule(nn.Module):
    def __init__(self, features=2048, out_features=512, sizes=(1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(output_size=(s, s)),
                                                   nn.Conv2d(features, out_features, kernel_size=1, bias=False),
                                                   ABN(out_features)) for s in sizes])
        self.bottleneck = nn.Sequential(
            nn.Conv2d(features + len(sizes) * out_features, out_features, kernel_size=3, padding=1, bias=False),
            ABN(out_features))

    def forward(self, feats):
        h, w = feats.size(2), feats.size(3)
        priors = [up(stage(feats), (h, w)) for stage in self.stages] + [feats]
        return self.bottleneck(torch.cat(priors, 1))


class Edge_Module(nn.Module):
    def __init__(self, in_fea=(256, 512, 1024), mid_fea=256, out_fea=2):
        super().__init__()
        for i, c in enumerate(in_fea, 1):
            setattr(self, f"conv{i}", nn.Sequential(nn.Conv2d(c, mid_fea, kernel_size=1, bias=False), ABN(mid_fea)))
        self.conv4 = nn.Conv2d(mid_fea, out_fea, kernel_size=3, padding=1, bias=True)
        self.conv5 = nn.Conv2d(out_fea * 3, out_fea, kernel_size=1, bias=True)

    def forward(self, x1, x2, x3):
        h, w = x1.size(2), x1.size(3)
        edge1_fea = self.conv1(x1)
        edge1 = self.conv4(edge1_fea)
        edge2_fea = self.conv2(x2)
        edge2 = self.conv4(edge2_fea)
        edge3_fea = self.conv3(x3)
        edge3 = self.conv4(edge3_fea)
        edge2_fea, edge3_fea = up(edge2_fea, (h, w)), up(edge3_fea, (h, w))
        edge2, edge3 = up(edge2, (h, w)), up(edge3, (h, w))
        edge = self.conv5(torch.cat([edge1, edge2, edge3], dim=1))
        return edge, torch.cat([edge1_fea, edge2_fea, edge3_fea], dim=1)


class Decoder_Module(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(512, 256, kernel_size=1, bias=False), ABN(256))
        self.conv2 = nn.Sequential(nn.Conv2d(256, 48, kernel_size=1, bias=False), ABN(48))
        self.conv3 = nn.Sequential(nn.Conv2d(304, 256, kernel_size=1, bias=False), ABN(256),
                                   nn.Conv2d(256, 256, kernel_size=1, bias=False), ABN(256))
        self.conv4 = nn.Conv2d(256, num_classes, kernel_size=1, bias=True)

    def forward(self, xt, xl):
        h, w = xl.size(2), xl.size(3)
        xt = up(self.conv1(xt), (h, w))
        x = self.conv3(torch.cat([xt, self.conv2(xl)], dim=1))
        return self.conv4(x), x


class ResNet(nn.Module):
    def __init__(self, block=Bottleneck, layers=(3, 4, 23, 3), num_classes=7):
        super().__init__()
        self.inplanes = 128
        self.conv1 = conv3x3(3, 64, stride=2)
        self.bn1 = BatchNorm2d(64)
        self.conv2 = conv3x3(64, 64)
        self.bn2 = BatchNorm2d(64)
        self.conv3 = conv3x3(64, 128)
        self.bn3 = BatchNorm2d(128)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=1, dilation=2, multi_grid=(1, 1, 1))
        self.context_encoding = PSPModule(2048, 512)
        self.edge = Edge_Module()
        self.decoder = Decoder_Module(num_classes)
        self.fushion = nn.Sequential(nn.Conv2d(1024, 256, kernel_size=1, bias=False), ABN(256),
                                     nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, kernel_size=1, bias=True))

    def _make_layer(self, block, planes, blocks, stride=1, dilation=1, multi_grid=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                BatchNorm2d(planes * block.expansion))
        grid = lambda i: multi_grid[i % len(multi_grid)] if isinstance(multi_grid, tuple) else 1  # noqa: E731
        layers = [block(self.inplanes, planes, stride, dilation=dilation, downsample=downsample,
                        multi_grid=grid(0))]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=dilation, multi_grid=grid(i)) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        x2 = self.layer1(x)
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        x5 = self.layer4(x4)
        x = self.context_encoding(x5)
        parsing_result, parsing_fea = self.decoder(x, x2)
        edge_result, edge_fea = self.edge(x2, x3, x4)
        fusion_result = self.fushion(torch.cat([parsing_fea, edge_fea], dim=1))
        return [[parsing_result, fusion_result], [edge_result]]


def load_model(checkpoint_path, num_classes):
    model = ResNet(num_classes=num_classes)
    state_dict = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k[len("module."):] if k.startswith("module.") else k: v
                           for k, v in state_dict.items()}, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- simple_extractor.py
def get_palette(num_cls):
    palette = [0] * (num_cls * 3)
    for j in range(num_cls):
        lab, i = j, 0
        while lab:
            palette[j * 3 + 0] |= ((lab >> 0) & 1) << (7 - i)
            palette[j * 3 + 1] |= ((lab >> 1) & 1) << (7 - i)
            palette[j * 3 + 2] |= ((lab >> 2) & 1) << (7 - i)
            i += 1
            lab >>= 3
    return palette


def run_original(image_path, checkpoint_path, dataset, model=None):
    """-> (labels uint8 h x w, logits float32 h x w x C) for one image, as the original writes them.

    `model` may be passed to reuse an already loaded network (from load_model)."""
    input_size, num_classes = DATASETS[dataset]
    if model is None:
        model = load_model(checkpoint_path, num_classes)
    image, c, s, w, h = preprocess(image_path, input_size)
    with torch.no_grad():
        output = model(image)
        upsample = torch.nn.Upsample(size=input_size, mode="bilinear", align_corners=True)
        upsample_output = upsample(output[0][-1][0].unsqueeze(0)).squeeze(0).permute(1, 2, 0)  # CHW -> HWC
    logits = transform_logits(upsample_output.numpy(), c, s, w, h, input_size=input_size)
    labels = np.asarray(np.argmax(logits, axis=2), dtype=np.uint8)
    return labels, logits.astype(np.float32, copy=False)
