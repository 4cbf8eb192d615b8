"""The ImageNet backbone the released training starts from: a flat deep-stem ResNet-101 state dict.

Only the backbone layers are taken; the classifier `fc.*` and `num_batches_tracked` are skipped, and
CE2P's own context, edge and decoder modules keep their initialisation.
"""
from pathlib import Path

import torch

from schp.errors import SetupError

IMAGENET_URL = "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/resnet101-imagenet.pth"
BACKBONE = ("conv1.", "conv2.", "conv3.", "bn1.", "bn2.", "bn3.", "layer1.", "layer2.", "layer3.", "layer4.")
PREFIX = "module."  # a backbone saved from nn.DataParallel


class PretrainedWeightsError(SetupError):
    """ImageNet backbone weights that cannot be used (missing, unreadable, another network)."""


def load_imagenet(model: torch.nn.Module, path: Path) -> None:
    """Load the backbone of `model` (a CE2P) from a ResNet-101 (deep stem) state dict file.

    Read with weights_only=True (no code from the file runs). Raises PretrainedWeightsError naming
    the `pretrained` file and the missing, unexpected or mis-shaped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"no such file; get the deep-stem ResNet-101 from {IMAGENET_URL}",
                                     "pretrained", str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reason: the file is not usable
        raise PretrainedWeightsError(f"not a readable state dict ({str(err).splitlines()[0][:200]})",
                                     "pretrained", str(path)) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    own = model.state_dict()
    wanted = [k for k in own if k.startswith(BACKBONE)]
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in own or not k.startswith(BACKBONE)]
    misshaped = [k for k in wanted if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or misshaped:
        parts = [f"{len(v)} {name} ({', '.join(v[:3])})" for name, v in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if v]
        raise PretrainedWeightsError("not a deep-stem ResNet-101: " + "; ".join(parts), "pretrained", str(path))
    own.update({k: state[k] for k in wanted})
    model.load_state_dict(own, strict=True)
