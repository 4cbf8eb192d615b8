"""The model call the batcher makes: HumanParser.parse, made batch-invariant so that an image's map does
not depend on which requests shared its forward pass.

The torch network on the CPU is batch-invariant itself (its pyramid pooling runs one sample at a
time: see PSPModule.forward), so a gathered batch goes through in one call and each image's map
equals, bit for bit, the command line's one image per forward pass. Backends that run an exported
graph (ONNX Runtime, OpenVINO), and CUDA, give no such promise; for them each image of a gathered
batch gets its own call.
"""
import logging
from typing import Callable, List

log = logging.getLogger("schp.service")


def batch_invariant_parse(parser) -> Callable[..., List]:
    """parse(images, with_logits=False) whose result for an image is that of parser.parse([image])."""
    if parser.backend == "torch" and parser.device.type == "cpu":
        return parser.parse

    def one_by_one(images, with_logits: bool = False) -> List:
        return [result for image in images for result in parser.parse([image], with_logits=with_logits)]

    log.info("%s on %s: each image of a batch gets its own forward call (batched calls of this backend "
             "are not known to give each image the same numbers)", parser.backend, parser.device)
    return one_by_one
