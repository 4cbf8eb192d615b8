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
    """parse(images, with_logits=False) whose result for an image is that of parser.parse([image]).

    With `--backend auto` the parser may switch from torch to a runtime once that is ready: here,
    between two batches, so that each batch is parsed the way its backend allows."""
    if parser.background is None and parser.backend == "torch" and parser.device.type == "cpu":
        return parser.parse
    parser.switch_on_forward = False
    told = set()

    def parse(images, with_logits: bool = False) -> List:
        backend = parser.wait_for_backend(0)
        if backend == "torch" and parser.device.type == "cpu":
            return parser.parse(images, with_logits=with_logits)
        if backend not in told:
            told.add(backend)
            log.info("%s on %s: each image of a batch gets its own forward call (batched calls of this backend "
                     "are not known to give each image the same numbers)", backend, parser.device)
        return [result for image in images for result in parser.parse([image], with_logits=with_logits)]

    return parse
