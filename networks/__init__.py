"""Networks of the SCHP extractor: the CE2P human parser."""
from networks.ce2p import CE2P, CE2POutput, InPlaceABN, build_ce2p, fold_abn

__all__ = ["CE2P", "CE2POutput", "InPlaceABN", "build_ce2p", "fold_abn"]
