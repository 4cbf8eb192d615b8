"""The SCHP training loss: parsing (Lovasz + cross-entropy, or + KL to soft targets), edge, consistency.

Every term upsamples its logits to the label size first (bilinear, align_corners=True). In the
self-correction phase the soft targets mix logits, not probabilities: softmax((1-a)*z + a*onehot),
and the KL is averaged over pixels *and* classes (PyTorch's old 'mean'), both as released.

Released quirk kept by default (`fix_ignore=False`): building the one-hot target overwrote the label
tensor's 255 (ignore) with 0 after the parsing head's Lovasz, so from there on every KL term, the
fusion head's Lovasz and the consistency term treat ignored pixels (crop padding too) as background.
`fix_ignore=True` keeps 255 ignored everywhere.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from schp.data.augment import IGNORE_LABEL, edge_target


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored pixels (0 when there is none, where PyTorch gives NaN)."""
    if not (labels != IGNORE_LABEL).any():
        return logits.sum() * 0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL)


def edge_loss(edge_logits: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Class-balanced 2-class cross-entropy: 0.5 * (mean NLL over edge pixels + mean over the others).

    Weights [pos, neg] / total as released; a batch without edge pixels (or without non-edge
    pixels) gives 0 instead of the released 0/0 = NaN.
    """
    target = edges.long()
    pos = (target == 1).sum()
    neg = (target == 0).sum()
    if pos == 0 or neg == 0:
        return edge_logits.sum() * 0
    total = (pos + neg).float()
    weight = torch.stack([pos.float() / total, neg.float() / total]).to(edge_logits.dtype)
    return F.cross_entropy(edge_logits, target, weight=weight)


def lovasz_grad(sorted_truth: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss at the sorted errors."""
    gts = sorted_truth.sum()
    intersection = gts - sorted_truth.cumsum(0)
    union = gts + (1 - sorted_truth).cumsum(0)
    jaccard = 1.0 - intersection / union
    if len(sorted_truth) > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovasz-softmax over the whole batch jointly, classes present in the labels, 255 ignored.

    Mean over present classes of dot(sorted |[y == c] - p_c|, Lovasz gradient); 0 if no pixel is valid.
    """
    probs = F.softmax(logits, dim=1)
    num_classes = probs.shape[1]
    probs = probs.permute(0, 2, 3, 1).reshape(-1, num_classes)
    labels = labels.reshape(-1)
    keep = labels != IGNORE_LABEL
    probs, labels = probs[keep], labels[keep]
    losses = []
    for c in torch.unique(labels).tolist():
        truth = (labels == c).to(probs.dtype)
        errors = (truth - probs[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(truth[order])))
    if not losses:
        return logits.sum() * 0
    return torch.stack(losses).mean()


def kl_mean(logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(logits)) over pixels with label != 255, averaged over P x C elements."""
    num_classes = logits.shape[1]
    keep = (labels != IGNORE_LABEL).reshape(-1)
    log_q = F.log_softmax(logits, dim=1).permute(0, 2, 3, 1).reshape(-1, num_classes)[keep]
    t = F.softmax(target_logits, dim=1).permute(0, 2, 3, 1).reshape(-1, num_classes)[keep]
    if log_q.shape[0] == 0:
        return logits.sum() * 0
    return F.kl_div(log_q, t, reduction="sum") / log_q.numel()  # the legacy 'mean', without its warning


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B x C x H x W one-hot of B x H x W labels; 255 gives a row of zeros (never reached when mutated)."""
    valid = labels != IGNORE_LABEL
    hot = F.one_hot(torch.where(valid, labels, torch.zeros_like(labels)), num_classes)
    hot = hot * valid[..., None]
    return hot.permute(0, 3, 1, 2).float()


@torch.no_grad()
def consistency(parsing_logits: torch.Tensor, edge_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The released parsing/edge consistency term: smooth-L1 between the edges of the predicted parsing
    and the predicted edges where both are 1, so always 0 with no gradient (0 when nothing is
    compared, where the released code gave NaN). Computed for the log only."""
    predicted = parsing_logits.argmax(1)
    predicted[labels == IGNORE_LABEL] = IGNORE_LABEL
    generated = edge_target(predicted)
    predicted_edge = edge_logits.argmax(1).float()
    keep = labels != IGNORE_LABEL
    generated, predicted_edge = generated[keep], predicted_edge[keep]
    mask = (generated == 1) & (predicted_edge == 1)
    if not mask.any():
        return parsing_logits.new_zeros(())
    return F.smooth_l1_loss(generated[mask], predicted_edge[mask])


class SCHPLoss(nn.Module):
    """Total loss of one batch and its terms, for the hard-label (cycle 0) and self-correction phases.

    `outputs` = (parsing, fusion, edge) logits at network resolution; `labels` B x H x W int64 with
    255 = ignore; `edges` the edge target; `soft` = (fusion, edge) logits of the SCHP model, needed
    when cycle_n >= 1. Returns (total, {term: value}); the terms are detached.
    """

    TERMS = ("parsing", "fusion", "edge", "consistency")

    def __init__(self, lambda_s: float = 1.0, lambda_e: float = 1.0, lambda_c: float = 0.1,
                 fix_ignore: bool = False):
        super().__init__()
        self.lambda_s, self.lambda_e, self.lambda_c = lambda_s, lambda_e, lambda_c
        self.fix_ignore = fix_ignore

    def forward(self, outputs, labels: torch.Tensor, edges: torch.Tensor, cycle_n: int = 0,
                soft: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        size = labels.shape[-2:]
        parsing, fusion, edge = (upsample(o.float(), size) for o in outputs)
        terms: Dict[str, torch.Tensor] = {}
        if cycle_n == 0:
            for name, o in (("parsing", parsing), ("fusion", fusion)):
                terms[name] = 0.5 * self.lambda_s * (lovasz_softmax(o, labels) + cross_entropy(o, labels))
            terms["edge"] = self.lambda_e * edge_loss(edge, edges)
            cons_labels = labels
        else:
            if soft is None:
                raise ValueError("the self-correction phase needs the SCHP model's logits")
            a = 1.0 / (cycle_n + 1)
            soft_fusion, soft_edge = (upsample(s.float(), size) for s in soft)
            lovasz_parsing = lovasz_softmax(parsing, labels)
            # the released to_one_hot overwrote 255 -> 0 in place here
            mixed = labels if self.fix_ignore else labels.masked_fill(labels == IGNORE_LABEL, 0)
            target = (1 - a) * soft_fusion + a * one_hot(mixed, parsing.shape[1])
            terms["parsing"] = 0.5 * self.lambda_s * (lovasz_parsing + kl_mean(parsing, target, mixed))
            terms["fusion"] = 0.5 * self.lambda_s * (lovasz_softmax(fusion, mixed)
                                                     + kl_mean(fusion, target, mixed))
            edge_soft = (1 - a) * soft_edge + a * one_hot(edges.long(), 2)
            terms["edge"] = self.lambda_e * kl_mean(edge, edge_soft, mixed)
            cons_labels = mixed
        terms["consistency"] = self.lambda_c * (consistency(parsing, edge, cons_labels)
                                                + consistency(fusion, edge, cons_labels))
        total = terms["parsing"] + terms["fusion"] + terms["edge"] + terms["consistency"]
        return total, {k: v.detach() for k, v in terms.items()}
