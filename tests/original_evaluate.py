"""Test oracle: a plain transliteration of the released SCHP evaluator.

It follows the published code line by line -- ``evaluate.py`` (main, multi_scale_testing),
``datasets/datasets.py`` (LIPDataValSet), ``utils/transforms.py`` (get_affine_transform,
transform_parsing) and ``utils/miou.py`` (get_confusion_matrix, compute_mean_ioU) -- on the CPU, one
image at a time, keeping every prediction in a list as the original did. It imports nothing from the
project; the network is passed in as a callable returning ``[[parsing, fusion], [edge]]`` (the tests
use tests/original_pipeline.py's transliterated network). Two departures, both the documented fixes
without which the original cannot run on these datasets: the left/right channel swap of the flip is
taken per dataset (the original's LIP indices crash for ATR and Pascal), and the split name is a
parameter (the original hard-codes 'val').

    result = run_original_evaluate(model, data_dir, "lip", input_size=[64, 64], flip=True)
"""
import os
from collections import OrderedDict

import cv2
import numpy as np
import torch
from PIL import Image as PILImage

# the released: flipped_output[14:20, :, :] = flipped_output[(15, 14, 17, 16, 19, 18), :, :]
FLIP_SWAPS = {
    "lip": (slice(14, 20), (15, 14, 17, 16, 19, 18)),
    "atr": (slice(9, 16), (10, 9, 11, 13, 12, 15, 14)),  # (9,10) shoes, (12,13) legs, (14,15) arms
    "pascal": None,  # no left/right classes
}
NUM_CLASSES = {"lip": 20, "atr": 18, "pascal": 7}


# ----------------------------------------------------------------------------- utils/transforms.py
def get_3rd_point(a, b):
    direct = a - b
    return b + np.array([-direct[1], direct[0]], dtype=np.float32)


def get_dir(src_point, rot_rad):
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    src_result = [0, 0]
    src_result[0] = src_point[0] * cs - src_point[1] * sn
    src_result[1] = src_point[0] * sn + src_point[1] * cs
    return src_result


def get_affine_transform(center, scale, rot, output_size, shift=np.array([0, 0], dtype=np.float32), inv=0):
    if not isinstance(scale, np.ndarray) and not isinstance(scale, list):
        print(scale)
        scale = np.array([scale, scale])
    scale_tmp = scale
    src_w = scale_tmp[0]
    dst_w = output_size[1]
    dst_h = output_size[0]
    rot_rad = np.pi * rot / 180
    src_dir = get_dir([0, src_w * -0.5], rot_rad)
    dst_dir = np.array([0, (dst_w - 1) * -0.5], np.float32)
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0, :] = center + scale_tmp * shift
    src[1, :] = center + src_dir + scale_tmp * shift
    dst[0, :] = [(dst_w - 1) * 0.5, (dst_h - 1) * 0.5]
    dst[1, :] = np.array([(dst_w - 1) * 0.5, (dst_h - 1) * 0.5]) + dst_dir
    src[2:, :] = get_3rd_point(src[0, :], src[1, :])
    dst[2:, :] = get_3rd_point(dst[0, :], dst[1, :])
    if inv:
        trans = cv2.getAffineTransform(np.float32(dst), np.float32(src))
    else:
        trans = cv2.getAffineTransform(np.float32(src), np.float32(dst))
    return trans


def transform_parsing(pred, center, scale, width, height, input_size):
    trans = get_affine_transform(center, scale, 0, input_size, inv=1)
    target_pred = cv2.warpAffine(pred, trans, (int(width), int(height)), flags=cv2.INTER_NEAREST,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=(0))
    return target_pred


# ----------------------------------------------------------------------------- datasets/datasets.py
class LIPDataValSet:
    def __init__(self, root, dataset="val", crop_size=(473, 473), flip=False):
        self.root = root
        self.crop_size = crop_size
        self.flip = flip
        self.dataset = dataset
        self.aspect_ratio = crop_size[1] * 1.0 / crop_size[0]
        self.crop_size = np.asarray(crop_size)
        list_path = os.path.join(self.root, self.dataset + "_id.txt")
        val_list = [i_id.strip() for i_id in open(list_path)]
        self.val_list = val_list
        self.number_samples = len(self.val_list)

    def __len__(self):
        return len(self.val_list)

    def _box2cs(self, box):
        x, y, w, h = box[:4]
        return self._xywh2cs(x, y, w, h)

    def _xywh2cs(self, x, y, w, h):
        center = np.zeros((2), dtype=np.float32)
        center[0] = x + w * 0.5
        center[1] = y + h * 0.5
        if w > self.aspect_ratio * h:
            h = w * 1.0 / self.aspect_ratio
        elif w < self.aspect_ratio * h:
            w = h * self.aspect_ratio
        scale = np.array([w, h], dtype=np.float32)
        return center, scale

    def transform(self, image):  # ToTensor + Normalize(mean=[0.406, 0.456, 0.485], std=[0.225, 0.224, 0.229])
        x = torch.from_numpy(image.transpose((2, 0, 1))).contiguous().float().div(255)
        mean = torch.as_tensor([0.406, 0.456, 0.485], dtype=torch.float32)
        std = torch.as_tensor([0.225, 0.224, 0.229], dtype=torch.float32)
        return x.sub_(mean[:, None, None]).div_(std[:, None, None])

    def __getitem__(self, index):
        val_item = self.val_list[index]
        im_path = os.path.join(self.root, self.dataset + "_images", val_item + ".jpg")
        im = cv2.imread(im_path, cv2.IMREAD_COLOR)
        h, w, _ = im.shape
        person_center, s = self._box2cs([0, 0, w - 1, h - 1])
        r = 0
        trans = get_affine_transform(person_center, s, r, self.crop_size)
        input = cv2.warpAffine(im, trans, (int(self.crop_size[1]), int(self.crop_size[0])),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        input = self.transform(input)
        flip_input = input.flip(dims=[-1])
        if self.flip:
            batch_input_im = torch.stack([input, flip_input])
        else:
            batch_input_im = input
        meta = {"name": val_item, "center": person_center, "height": h, "width": w, "scale": s, "rotation": r}
        return batch_input_im, meta


def collate_one(item):
    """DataLoader(batch_size=1) default collate of one (tensor, meta) item."""
    image, meta = item
    return image.unsqueeze(0), {"name": [meta["name"]], "center": torch.from_numpy(meta["center"][None]),
                                "scale": torch.from_numpy(meta["scale"][None]),
                                "width": torch.tensor([meta["width"]]), "height": torch.tensor([meta["height"]])}


# ----------------------------------------------------------------------------- evaluate.py
def multi_scale_testing(model, batch_input_im, crop_size=(473, 473), flip=True, multi_scales=(1,), swap=None):
    if len(batch_input_im.shape) > 4:
        batch_input_im = batch_input_im.squeeze()
    if len(batch_input_im.shape) == 3:
        batch_input_im = batch_input_im.unsqueeze(0)

    interp = torch.nn.Upsample(size=crop_size, mode="bilinear", align_corners=True)
    ms_outputs = []
    for s in multi_scales:
        interp_im = torch.nn.Upsample(scale_factor=s, mode="bilinear", align_corners=True)
        scaled_im = interp_im(batch_input_im)
        parsing_output = model(scaled_im)
        parsing_output = parsing_output[0][-1]
        output = parsing_output[0]
        if flip:
            flipped_output = parsing_output[1]
            if swap is not None:
                flipped_output[swap[0], :, :] = flipped_output[swap[1], :, :]
            output += flipped_output.flip(dims=[-1])
            output *= 0.5
        output = interp(output.unsqueeze(0))
        ms_outputs.append(output[0])
    ms_fused_parsing_output = torch.stack(ms_outputs)
    ms_fused_parsing_output = ms_fused_parsing_output.mean(0)
    ms_fused_parsing_output = ms_fused_parsing_output.permute(1, 2, 0)  # HWC
    parsing = torch.argmax(ms_fused_parsing_output, dim=2)
    parsing = parsing.data.cpu().numpy()
    ms_fused_parsing_output = ms_fused_parsing_output.data.cpu().numpy()
    return parsing, ms_fused_parsing_output


def get_palette(num_cls):
    n = num_cls
    palette = [0] * (n * 3)
    for j in range(0, n):
        lab = j
        palette[j * 3 + 0] = 0
        palette[j * 3 + 1] = 0
        palette[j * 3 + 2] = 0
        i = 0
        while lab:
            palette[j * 3 + 0] |= (((lab >> 0) & 1) << (7 - i))
            palette[j * 3 + 1] |= (((lab >> 1) & 1) << (7 - i))
            palette[j * 3 + 2] |= (((lab >> 2) & 1) << (7 - i))
            i += 1
            lab >>= 3
    return palette


# ----------------------------------------------------------------------------- utils/miou.py
def get_confusion_matrix(gt_label, pred_label, num_classes):
    index = (gt_label * num_classes + pred_label).astype("int32")
    label_count = np.bincount(index)
    confusion_matrix = np.zeros((num_classes, num_classes))
    for i_label in range(num_classes):
        for i_pred_label in range(num_classes):
            cur_index = i_label * num_classes + i_pred_label
            if cur_index < len(label_count):
                confusion_matrix[i_label, i_pred_label] = label_count[cur_index]
    return confusion_matrix


def compute_mean_ioU(preds, scales, centers, num_classes, datadir, input_size=(473, 473), dataset="val"):
    val_file = os.path.join(datadir, dataset + "_id.txt")
    val_id = [i_id.strip() for i_id in open(val_file)]
    confusion_matrix = np.zeros((num_classes, num_classes))
    for i, pred_out in enumerate(preds):
        im_name = val_id[i]
        gt_path = os.path.join(datadir, dataset + "_segmentations", im_name + ".png")
        gt = np.array(PILImage.open(gt_path))
        h, w = gt.shape
        s = scales[i]
        c = centers[i]
        pred = transform_parsing(pred_out, c, s, w, h, input_size)
        gt = np.asarray(gt, dtype=np.int32)
        pred = np.asarray(pred, dtype=np.int32)
        ignore_index = gt != 255
        gt = gt[ignore_index]
        pred = pred[ignore_index]
        confusion_matrix += get_confusion_matrix(gt, pred, num_classes)
    pos = confusion_matrix.sum(1)
    res = confusion_matrix.sum(0)
    tp = np.diag(confusion_matrix)
    pixel_accuracy = (tp.sum() / pos.sum()) * 100
    mean_accuracy = ((tp / np.maximum(1.0, pos)).mean()) * 100
    IoU_array = (tp / np.maximum(1.0, pos + res - tp))
    IoU_array = IoU_array * 100
    mean_IoU = IoU_array.mean()
    name_value = [(str(i), iou) for i, iou in enumerate(IoU_array)]
    name_value.append(("Pixel accuracy", pixel_accuracy))
    name_value.append(("Mean accuracy", mean_accuracy))
    name_value.append(("Mean IU", mean_IoU))
    return OrderedDict(name_value), confusion_matrix


def default_input_size(dataset):
    return [473, 473] if dataset == "lip" else [512, 512]


def run_original_evaluate(model, data_dir, dataset, input_size=None, flip=False, multi_scales=(1,),
                          save_dir=None, split="val"):
    """evaluate.py main() -> (OrderedDict of per-class IoU and the three figures, confusion matrix).

    With `save_dir`, writes `<save_dir>/<id>.png` as --save-results did."""
    input_size = list(input_size or default_input_size(dataset))
    preds, scales, centers = original_predictions(model, data_dir, dataset, input_size, flip, multi_scales,
                                                  save_dir, split)
    return compute_mean_ioU(preds, scales, centers, NUM_CLASSES[dataset], data_dir, input_size, split)


def original_predictions(model, data_dir, dataset, input_size=None, flip=False, multi_scales=(1,),
                         save_dir=None, split="val"):
    """The prediction loop of evaluate.py main() -> (parsing_preds, scales, centers) as it passes them to
    compute_mean_ioU (the ground truth is read only there)."""
    input_size = list(input_size or default_input_size(dataset))
    lip_test_dataset = LIPDataValSet(data_dir, split, crop_size=input_size, flip=flip)
    num_samples = len(lip_test_dataset)
    palette = get_palette(20)
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
    parsing_preds = []
    scales = np.zeros((num_samples, 2), dtype=np.float32)
    centers = np.zeros((num_samples, 2), dtype=np.int32)
    with torch.no_grad():
        for idx in range(num_samples):
            image, meta = collate_one(lip_test_dataset[idx])
            if len(image.shape) > 4:
                image = image.squeeze()
            im_name = meta["name"][0]
            c = meta["center"].numpy()[0]
            s = meta["scale"].numpy()[0]
            w = meta["width"].numpy()[0]
            h = meta["height"].numpy()[0]
            scales[idx, :] = s
            centers[idx, :] = c
            parsing, logits = multi_scale_testing(model, image, crop_size=input_size, flip=flip,
                                                  multi_scales=multi_scales, swap=FLIP_SWAPS[dataset])
            if save_dir is not None:
                parsing_result = transform_parsing(parsing, c, s, w, h, input_size)
                parsing_result_path = os.path.join(save_dir, im_name + ".png")
                output_im = PILImage.fromarray(np.asarray(parsing_result, dtype=np.uint8))
                output_im.putpalette(palette)
                output_im.save(parsing_result_path)
            parsing_preds.append(parsing)
    return parsing_preds, scales, centers
