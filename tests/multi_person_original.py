"""Test oracle: a literal transliteration of the released multi-person extension's steps 3, 5 and 6.

`make_crop_and_mask_w_mask_nms.py` (crop and mask NMS), the evaluator's `.npy` logits of each crop and
whole image (through tests/original_pipeline.py's transliterated extractor), and `logits_fusion.py`
(paste-back, fusion, get_instance, the flood-fill refine, compute_confidence, result_saving) -- with the
same loops, the same files on disk, the same text formats. Deviations, all forced: the third fused
branch (`msrcnn_output_dir`, whose argument the published script lacks) is left out, predictions are
matched on `image_id` instead of list position, and the evaluator's checkpoint container (a bare state
dict) is read with weights_only. Imports nothing from the project.
"""
import json
import os

import cv2
import numpy as np
import torch
from PIL import Image as PILImage

import original_pipeline


# ----------------------------------------------------------------------------- make_crop_and_mask_w_mask_nms.py
def bbox_expand(img_height, img_width, bbox, exp_ratio):
    x_min, y_min, x_max, y_max = bbox[:]
    exp_x = (x_max - x_min) * ((exp_ratio - 1) / 2)
    exp_y = (y_max - y_min) * ((exp_ratio - 1) / 2)
    new_x_min = 0 if x_min - exp_x < 0 else np.round(x_min - exp_x)
    new_y_min = 0 if y_min - exp_y < 0 else np.round(y_min - exp_y)
    new_x_max = img_width - 1 if x_max + exp_x > img_width - 1 else np.round(x_max + exp_x)
    new_y_max = img_height - 1 if y_max + exp_y > img_height - 1 else np.round(y_max + exp_y)
    return int(new_x_min), int(new_y_min), int(new_x_max), int(new_y_max)


def make_crop_and_mask(img_dir, img_info, pred, crop_save_dir, mask_save_dir, exp_ratio=1.2,
                       overlap_threshold=0.5, conf_thres=0.5):
    """-> the crop.json item of one image; writes the crops (JPEG) and the person map (.npy)."""
    from pycocotools import mask as mask_util

    img_name = img_info['file_name']
    img_w = img_info['width']
    img_h = img_info['height']
    img = cv2.imread(os.path.join(img_dir, img_name))
    exp_bbox, ori_bbox, bbox_name_list, bbox_score_list = [], [], [], []
    person_idx = 0
    panoptic_seg = np.zeros((img_h, img_w), dtype=np.uint8)
    assert len(pred['instances']) > 0
    for instance in pred['instances']:
        score = instance['score']
        if score < conf_thres:
            break
        mask = mask_util.decode(instance['segmentation'])
        mask_area = mask.sum()
        if mask_area == 0:
            continue
        intersect = (mask > 0) & (panoptic_seg > 0)
        intersect_area = intersect.sum()
        if intersect_area * 1.0 / mask_area > overlap_threshold:
            continue
        if intersect_area > 0:
            mask = mask & (panoptic_seg == 0)
        person_idx += 1
        panoptic_seg = np.where(mask == 0, panoptic_seg, person_idx)
        bbox_score_list.append(score)
        x_min, y_min, box_w, box_h = instance['bbox']
        x_max, y_max = x_min + box_w, y_min + box_h
        exp_x_min, exp_y_min, exp_x_max, exp_y_max = bbox_expand(img_h, img_w, [x_min, y_min, x_max, y_max],
                                                                 exp_ratio)
        crop_img = img[exp_y_min:exp_y_max + 1, exp_x_min:exp_x_max + 1, :]
        exp_bbox.append([exp_x_min, exp_y_min, exp_x_max, exp_y_max])
        ori_bbox.append([x_min, y_min, x_max, y_max])
        bbox_name = os.path.splitext(img_name)[0] + '_' + str(person_idx) + '_msrcnn.jpg'
        bbox_name_list.append(bbox_name)
        cv2.imwrite(os.path.join(crop_save_dir, bbox_name), crop_img)
    assert person_idx > 0
    mask_name = os.path.splitext(img_name)[0] + '_mask.npy'
    np.save(os.path.join(mask_save_dir, mask_name), panoptic_seg)
    return {'dataset': 'CIHP', 'im_name': img_name, 'img_height': img_h, 'img_width': img_w,
            'center': [img_h / 2, img_w / 2], 'person_num': person_idx, 'person_bbox': exp_bbox,
            'real_person_bbox': ori_bbox, 'person_bbox_score': bbox_score_list, 'bbox_name': bbox_name_list,
            'mask_name': mask_name}


# ----------------------------------------------------------------------------- global_local_evaluate.py
def load_evaluator_model(checkpoint_path, num_classes):
    """The evaluator's loading: the object is the state dict (or, released container, its 'state_dict')."""
    state_dict = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if 'state_dict' in state_dict:
        state_dict = state_dict['state_dict']
    model = original_pipeline.ResNet(num_classes=num_classes)
    model.load_state_dict({k[7:]: v for k, v in state_dict.items()}, strict=True)
    return model.eval()


def save_logits(image_path, model, dataset, out_dir):
    """`<id>.npy` logits of one file, as the evaluator writes them."""
    _, logits = original_pipeline.run_original(image_path, None, dataset, model=model)
    name = os.path.splitext(os.path.basename(image_path))[0]
    np.save(os.path.join(out_dir, name + '.npy'), logits)


# ----------------------------------------------------------------------------- logits_fusion.py
def extend(si, sj, instance_label, global_label, panoptic_seg_mask, class_map):
    directions = [[-1, 0], [0, 1], [1, 0], [0, -1],
                  [1, 1], [1, -1], [-1, 1], [-1, -1]]
    inst_class = instance_label[si, sj]
    human_class = panoptic_seg_mask[si, sj]
    global_class = class_map[inst_class]
    queue = [[si, sj]]
    while len(queue) != 0:
        cur = queue[0]
        queue.pop(0)
        for direction in directions:
            ni = cur[0] + direction[0]
            nj = cur[1] + direction[1]
            if ni >= 0 and nj >= 0 and \
                    ni < instance_label.shape[0] and \
                    nj < instance_label.shape[1] and \
                    instance_label[ni, nj] == 0 and \
                    global_label[ni, nj] == global_class:
                instance_label[ni, nj] = inst_class
                panoptic_seg_mask[ni, nj] = human_class
                queue.append([ni, nj])


def refine(instance_label, panoptic_seg_mask, global_label, class_map):
    for i in range(instance_label.shape[0]):
        for j in range(instance_label.shape[1]):
            if instance_label[i, j] != 0:
                extend(i, j, instance_label, global_label, panoptic_seg_mask, class_map)


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


def patch2img_output(patch_dir, img_name, img_height, img_width, bbox, bbox_type, num_class):
    output = np.zeros((img_height, img_width, num_class), dtype='float')
    output[:, :, 0] = np.inf
    count_predictions = np.zeros((img_height, img_width, num_class), dtype='int32')
    for i in range(len(bbox)):
        file_path = os.path.join(patch_dir, os.path.splitext(img_name)[0] + '_' + str(i + 1) + '_' + bbox_type + '.npy')
        bbox_output = np.load(file_path)
        output[bbox[i][1]:bbox[i][3] + 1, bbox[i][0]:bbox[i][2] + 1, 1:] += bbox_output[:, :, 1:]
        count_predictions[bbox[i][1]:bbox[i][3] + 1, bbox[i][0]:bbox[i][2] + 1, 1:] += 1
        output[bbox[i][1]:bbox[i][3] + 1, bbox[i][0]:bbox[i][2] + 1, 0] \
            = np.minimum(output[bbox[i][1]:bbox[i][3] + 1, bbox[i][0]:bbox[i][2] + 1, 0], bbox_output[:, :, 0])
    count_predictions[count_predictions == 0] = 1
    return output / count_predictions


def get_instance(cat_gt, panoptic_seg_mask):
    instance_gt = np.zeros_like(cat_gt, dtype=np.uint8)
    num_humans = len(np.unique(panoptic_seg_mask)) - 1
    class_map = {}
    total_part_num = 0
    for id in range(1, num_humans + 1):
        human_part_label = np.where(panoptic_seg_mask == id, cat_gt, 0).astype(np.uint8)
        part_classes = np.unique(human_part_label)
        exceed = False
        for part_id in part_classes:
            if part_id == 0:
                continue
            total_part_num += 1
            if total_part_num > 255:
                print("total_part_num exceed, return current instance map: {}".format(total_part_num))
                exceed = True
                break
            class_map[total_part_num] = part_id
            instance_gt[np.where(human_part_label == part_id)] = total_part_num
        if exceed:
            break
    ori_cur_labels = np.unique(instance_gt)
    total_num_label = len(ori_cur_labels)
    with np.errstate(over="ignore"):  # the original's uint8 max() + 1 wraps at 255 parts, as it did there
        relabel = instance_gt.max() + 1 != total_num_label
    if relabel:
        for label in range(1, total_num_label):
            instance_gt[instance_gt == ori_cur_labels[label]] = label
    final_class_map = {}
    for label in range(1, total_num_label):
        if label >= 1:
            final_class_map[label] = class_map[ori_cur_labels[label]]
    return instance_gt, final_class_map


def compute_confidence(im_name, feature_map, class_map, instance_label, output_dir, panoptic_seg_mask,
                       seg_score_list):
    conf_file = open(os.path.join(output_dir, os.path.splitext(im_name)[0] + '.txt'), 'w')
    weighted_map = np.zeros_like(feature_map[:, :, 0])
    for index, score in enumerate(seg_score_list):
        weighted_map += (panoptic_seg_mask == index + 1) * score
    for label in class_map.keys():
        cls = class_map[label]
        confidence = feature_map[:, :, cls].reshape(-1)[np.where(instance_label.reshape(-1) == label)]
        confidence = (weighted_map * feature_map[:, :, cls].copy()).reshape(-1)[
            np.where(instance_label.reshape(-1) == label)]
        confidence = confidence.sum() / len(confidence)
        conf_file.write('{} {}\n'.format(cls, confidence))
    conf_file.close()


def result_saving(fused_output, img_name, img_height, img_width, output_dir, mask_output_path, bbox_score,
                  msrcnn_bbox):
    global_root = os.path.join(output_dir, 'global_parsing')
    instance_root = os.path.join(output_dir, 'instance_parsing')
    tag_dir = os.path.join(output_dir, 'global_tag')
    for d in (output_dir, global_root, instance_root, tag_dir):
        if not os.path.exists(d):
            os.makedirs(d)
    palette = get_palette(256)
    fused_output = cv2.resize(fused_output, dsize=(img_width, img_height), interpolation=cv2.INTER_LINEAR)
    seg_pred = np.asarray(np.argmax(fused_output, axis=2), dtype=np.uint8)
    masks = np.load(mask_output_path)
    masks[np.where(seg_pred == 0)] = 0
    panoptic_seg_mask = masks
    seg_score_list = bbox_score
    instance_pred, class_map = get_instance(seg_pred, panoptic_seg_mask)
    refine(instance_pred, panoptic_seg_mask, seg_pred, class_map)
    compute_confidence(img_name, fused_output, class_map, instance_pred, instance_root,
                       panoptic_seg_mask, seg_score_list)
    ins_seg_results = open(os.path.join(tag_dir, os.path.splitext(img_name)[0] + '.txt'), "a")
    keep_human_id_list = list(np.unique(panoptic_seg_mask))
    if 0 in keep_human_id_list:
        keep_human_id_list.remove(0)
    for i in keep_human_id_list:
        ins_seg_results.write('{:.6f} {} {} {} {}\n'.format(seg_score_list[i - 1],
                                                            int(msrcnn_bbox[i - 1][1]), int(msrcnn_bbox[i - 1][0]),
                                                            int(msrcnn_bbox[i - 1][3]), int(msrcnn_bbox[i - 1][2])))
    ins_seg_results.close()
    output_im_global = PILImage.fromarray(seg_pred)
    output_im_instance = PILImage.fromarray(instance_pred)
    output_im_tag = PILImage.fromarray(panoptic_seg_mask)
    output_im_global.putpalette(palette)
    output_im_instance.putpalette(palette)
    output_im_tag.putpalette(palette)
    output_im_global.save(os.path.join(global_root, os.path.splitext(img_name)[0] + '.png'))
    output_im_instance.save(os.path.join(instance_root, os.path.splitext(img_name)[0] + '.png'))
    output_im_tag.save(os.path.join(tag_dir, os.path.splitext(img_name)[0] + '.png'))


def fusion(a, global_output_dir, gt_output_dir, mask_output_dir, save_dir):
    """multi_process of logits_fusion.py without the third (msrcnn) branch."""
    img_name = a['im_name']
    global_output = np.load(os.path.join(global_output_dir, os.path.splitext(img_name)[0] + '.npy'))
    gt_output = patch2img_output(gt_output_dir, img_name, a['img_height'], a['img_width'], a['person_bbox'],
                                 bbox_type='msrcnn', num_class=20)
    fused_output = global_output + gt_output
    mask_output_path = os.path.join(mask_output_dir, os.path.splitext(img_name)[0] + '_mask.npy')
    result_saving(fused_output, img_name, a['img_height'], a['img_width'], save_dir, mask_output_path,
                  a['person_bbox_score'], a['person_bbox'])


def run_released(img_dir, img_info, pred, global_model, local_model, dataset, work_dir):
    """Steps 3, 5 and 6 for one image, in the released layout under work_dir; returns the save dir."""
    d = {k: os.path.join(work_dir, k) for k in ('crop_pic', 'crop_mask', 'crop_pic_parsing',
                                                 'global_pic_parsing', 'result')}
    for path in d.values():
        os.makedirs(path, exist_ok=True)
    item = make_crop_and_mask(img_dir, img_info, pred, d['crop_pic'], d['crop_mask'])
    with open(os.path.join(work_dir, 'crop.json'), 'w') as f:
        json.dump({'root': [item]}, f, indent=2)
    for name in item['bbox_name']:
        save_logits(os.path.join(d['crop_pic'], name), local_model, dataset, d['crop_pic_parsing'])
    save_logits(os.path.join(img_dir, img_info['file_name']), global_model, dataset, d['global_pic_parsing'])
    fusion(item, d['global_pic_parsing'], d['crop_pic_parsing'], d['crop_mask'], d['result'])
    return d['result'], item
