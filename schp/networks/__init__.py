"""Networks of the SCHP extractor: the CE2P human parser."""
from schp.networks.ce2p import CE2P, CE2POutput, InPlaceABN, build_ce2p, fold_abn, folded_ce2p

ARCHITECTURES = ("resnet101",)


def init_model(name: str = "resnet101", num_classes: int = 20, pretrained=None) -> CE2P:
    """The original's model factory: `init_model('resnet101', num_classes=N, pretrained=None)`.

    Only CE2P on ResNet-101 exists, as in the released code. `pretrained`: an ImageNet backbone file
    (the deep-stem ResNet-101 the original trains from), loaded into the backbone; None keeps the
    random initialisation; an unusable file raises networks.imagenet.PretrainedWeightsError.
    """
    if name not in ARCHITECTURES:
        raise KeyError(f"Unknown model arch: {name}")
    model = build_ce2p(num_classes)
    if pretrained is not None:
        from schp.networks.imagenet import load_imagenet
        load_imagenet(model, pretrained)
    return model


__all__ = ["CE2P", "CE2POutput", "InPlaceABN", "build_ce2p", "fold_abn", "folded_ce2p", "init_model"]
