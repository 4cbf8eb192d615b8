"""The model call the batcher makes: HumanParser.parse, made batch-invariant so that an image's map does
not depend on which requests shared its forward pass.

Measured with torch 2.14 / oneDNN on the CPU (synthetic Pascal weights, demo crops at 512 x 512): in
a batch of 4 a sample's logits moved by up to 3e-5 against batch 1 and 1-3 pixels in 273,000 changed
class at near-ties. Layer by layer, the first outputs to differ are those of the pyramid pooling
module, whose 1x1 convolutions run on pooled 1x1 to 6x6 maps, where the library picks another kernel
for N samples than for one. Running that module one sample at a time (the same operations, in N
calls) made the logits of batches of 3 and 4 equal those of batch 1 exactly: the maps equal, bit for
bit, those of the command line's one image per forward pass. Backends that run an exported graph (ONNX Runtime,
OpenVINO) cannot be changed that way; for them each image of a gathered batch gets its own call.
"""
import logging
from typing import Callable, List

log = logging.getLogger("schp.service")


def _per_sample(module):
    import torch

    class PerSample(torch.nn.Module):
        """`module` applied to each sample of the batch alone, results concatenated."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if x.shape[0] == 1:
                return self.inner(x)
            return torch.cat([self.inner(x[i:i + 1]) for i in range(x.shape[0])])

    return PerSample(module)


def batch_invariant_parse(parser) -> Callable[..., List]:
    """parse(images, with_logits=False) whose result for an image is that of parser.parse([image])."""
    model = getattr(parser, "model", None)
    if model is not None and parser.device.type == "cpu" and hasattr(model, "context_encoding"):
        if type(model.context_encoding).__name__ != "PerSample":
            model.context_encoding = _per_sample(model.context_encoding)
        return parser.parse

    def one_by_one(images, with_logits: bool = False) -> List:
        return [result for image in images for result in parser.parse([image], with_logits=with_logits)]

    log.info("%s on %s: each image of a batch gets its own forward call (batched calls of this backend "
             "are not known to give each image the same numbers)", parser.backend, parser.device)
    return one_by_one
