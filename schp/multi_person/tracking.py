"""Persistent person identities through a video: mask IoU between frames and a minimum-cost assignment.

An instance source numbers the persons of each frame on its own; the tracker gives each person the id
it had before. A frame's persons are matched to the identities seen within the last `window` frames
by the IoU of their masks (each identity keeps the mask it had when last seen), one to one, maximising
the summed IoU (the Hungarian method); a pair below `min_iou` is no match. A person without a match
gets a new id, never one used before; ids stop at `max_id` (the person map is 8-bit), later persons
get 0 (no id) and are counted in `unassigned`.

Pure numpy: the assignment is the shortest-augmenting-path Hungarian method, O(n^2 m) for an n x m
cost matrix, plenty for the few persons of a frame.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

TRACK_WINDOW = 30  # frames an identity waits for its person to come back
TRACK_MIN_IOU = 0.3  # mask IoU below which two masks are not the same person
MAX_ID = 255


def linear_assignment(cost: np.ndarray) -> List[Tuple[int, int]]:
    """(row, column) pairs of a minimum-cost one-to-one assignment of a finite n x m matrix:
    min(n, m) pairs, sorted by row. Same optimum as scipy.optimize.linear_sum_assignment."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError("cost must be a 2-D matrix")
    if cost.size == 0:
        return []
    if not np.all(np.isfinite(cost)):
        raise ValueError("cost must be finite")
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T
    n, m = cost.shape
    # potentials u (rows), v (columns); p[j] = row matched to column j (1-based, 0 = none)
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used
            free[0] = False
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free[1:] & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.flatnonzero(free)
            j1 = int(candidates[np.argmin(minv[candidates])])
            delta = minv[j1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    pairs = [(int(p[j]) - 1, j - 1) for j in range(1, m + 1) if p[j]]
    if transposed:
        pairs = [(c, r) for r, c in pairs]
    return sorted(pairs)


def mask_ious(masks: Sequence[np.ndarray], others: Sequence[np.ndarray]) -> np.ndarray:
    """len(masks) x len(others) IoU of boolean masks of one size (0 where both are empty)."""
    if not len(masks) or not len(others):
        return np.zeros((len(masks), len(others)))
    a = np.stack([np.asarray(m, dtype=bool).ravel() for m in masks]).astype(np.float32)
    b = np.stack([np.asarray(m, dtype=bool).ravel() for m in others]).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


@dataclass
class Identity:
    mask: np.ndarray  # H x W bool, when last seen
    first: int  # frame index first and last seen
    last: int
    frames: int = 1


@dataclass
class IdentityTracker:
    """Ids of the persons of successive frames (frame indices increasing); see the module docstring."""
    window: int = TRACK_WINDOW
    min_iou: float = TRACK_MIN_IOU
    max_id: int = MAX_ID
    identities: Dict[int, Identity] = field(default_factory=dict)  # every id given, with its last mask
    next_id: int = 1
    unassigned: int = 0  # persons past max_id

    def assign(self, frame: int, masks: Sequence[np.ndarray]) -> List[int]:
        """The id of each mask of frame `frame` (0: none left), in the order given."""
        shape = np.shape(masks[0]) if len(masks) else None
        live = [k for k, ident in sorted(self.identities.items())
                if frame - ident.last <= self.window and ident.mask.shape == shape]  # frames may differ in size
        ious = mask_ious(masks, [self.identities[k].mask for k in live])
        ids = [0] * len(masks)
        for r, c in linear_assignment(-ious):
            if ious[r, c] >= self.min_iou:
                ids[r] = live[c]
        for r in range(len(masks)):
            if not ids[r]:
                if self.next_id > self.max_id:
                    self.unassigned += 1
                    continue
                ids[r] = self.next_id
                self.next_id += 1
        for r, k in enumerate(ids):
            if k:
                self._seen(k, frame, np.asarray(masks[r], dtype=bool))
        return ids

    def observe(self, frame: int, person_map: np.ndarray) -> None:
        """A frame whose ids were given before (a resumed run): its person map, 0 = nobody."""
        for k in np.unique(person_map):
            if k:
                self._seen(int(k), frame, person_map == k)
                self.next_id = max(self.next_id, int(k) + 1)

    def _seen(self, k: int, frame: int, mask: np.ndarray) -> None:
        ident = self.identities.get(k)
        if ident is None:
            self.identities[k] = Identity(mask, frame, frame)
        else:
            ident.mask, ident.last, ident.frames = mask, frame, ident.frames + 1

    def summary(self) -> Dict[str, Dict[str, int]]:
        """{id: first frame, last frame, frames seen} of every identity."""
        return {str(k): {"first": i.first, "last": i.last, "frames": i.frames}
                for k, i in sorted(self.identities.items())}
