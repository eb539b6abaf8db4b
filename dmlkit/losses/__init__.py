"""Metric-learning losses: pure functions, the stateful modules around them, a registry.

Every loss takes L2-normalized ``embeddings`` (B, D) and integer ``labels`` (B,) of any
values and returns a 0-dim tensor. Formulas, defaults and sources: docs/methods.md.
Numerics shared by all of them: distances and exponentials are computed in fp32 even
under autocast (half inputs are cast up; float64 stays float64), ``sqrt`` only sees
clamped arguments, exponentials go through a log-sum-exp, and a batch without a valid
pair/triplet (an empty batch, B = 0, included) gives a graph-connected 0 with zero
gradients — never NaN, unless an embedding is NaN or ±inf: then the loss is NaN (masks
would hide it). Inputs are checked first (``dmlkit.numerics.check_batch``): embeddings
2-D floating, labels 1-D integer of the same length on the same device, D equal to a
stateful loss's ``embedding_dim``; anything else is a ValueError.

The rooms: ``pair`` (contrastive, triplet, N-pair, Multi-Similarity), ``proxy_anchor``,
``daal`` (DAAL, a reconstruction), ``daal_variants`` (its alternatives), ``density`` (the
density-adaptive regularizer, which wraps any of them) and ``registry`` (``LOSSES``,
``build_loss``), which imports the others; no loss module imports the registry or this
package's namespace.
"""

from dmlkit.losses.daal import DAALLoss
from dmlkit.losses.daal_variants import DAALVariants
from dmlkit.losses.density import DensityAdaptive, class_statistics, density_regularizer
from dmlkit.losses.pair import (
    MINING,
    PAIR_LOSSES,
    PairLoss,
    contrastive_loss,
    multi_similarity_loss,
    npair_loss,
    triplet_margin_loss,
)
from dmlkit.losses.proxy_anchor import ProxyAnchorLoss, proxy_anchor_loss
from dmlkit.losses.registry import LOSSES, build_loss
from dmlkit.numerics import DISTANCES, pairwise_distance

__all__ = [
    "DISTANCES",
    "LOSSES",
    "MINING",
    "PAIR_LOSSES",
    "DAALLoss",
    "DAALVariants",
    "DensityAdaptive",
    "PairLoss",
    "ProxyAnchorLoss",
    "build_loss",
    "class_statistics",
    "contrastive_loss",
    "density_regularizer",
    "multi_similarity_loss",
    "npair_loss",
    "pairwise_distance",
    "proxy_anchor_loss",
    "triplet_margin_loss",
]
