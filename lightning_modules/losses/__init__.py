"""Losses, one file per family (pure: tensors in, tensors out); a method file imports its terms from here.

common      fp32 evaluation, log(1 - P), each term's share of the gradient
pairs       pair- and proxy-based metric losses: Multi-Similarity, CBML, XBM's contrastive memory, Proxy-Anchor
instance    instance discrimination: ISIF (UMM uses it on its means)
clustering  d+/d- to cluster centres: TAC-CCL's contrastive clustering loss, LMCS's J_D

The names below were `lightning_modules.losses.*` before the split and stay importable from here.
"""
from lightning_modules.losses.common import LOG_ONE_MINUS_EPS, fp32, gradient_shares, log1mexp
from lightning_modules.losses.pairs import (
    cbml_loss,
    contrastive_memory_loss,
    ms_mined_pairs,
    multi_similarity_loss,
    proxy_anchor,
    proxy_anchor_loss,
)

__all__ = ["LOG_ONE_MINUS_EPS", "cbml_loss", "contrastive_memory_loss", "fp32", "gradient_shares", "log1mexp",
           "ms_mined_pairs", "multi_similarity_loss", "proxy_anchor", "proxy_anchor_loss"]
