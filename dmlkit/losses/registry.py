"""The loss registry: every loss by name, and ``build_loss`` (optionally density-adaptive).

It imports every loss module; none of them imports it back.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from dmlkit.losses.daal_variants import DAALVariants
from dmlkit.losses.density import DensityAdaptive
from dmlkit.losses.pair import PAIR_LOSSES, PairLoss
from dmlkit.losses.proxy_anchor import ProxyAnchorLoss

LOSSES: dict[str, Callable[..., Any]] = {
    **PAIR_LOSSES,
    "proxy_anchor": ProxyAnchorLoss,
    # DAALLoss with its alternatives as keywords; with them off it is DAALLoss (tested).
    "daal": DAALVariants,
}
"""Every loss by name: a pure function (pair losses) or a module class (per-class state)."""


def _check_keywords(
    target: Callable[..., Any], given: dict[str, Any], what: str, exclude: tuple[str, ...] = ()
) -> None:
    """TypeError naming every key of ``given`` that ``target`` does not accept by keyword."""
    parameters = inspect.signature(target).parameters
    accepted = {n for n, p in parameters.items() if p.kind is p.KEYWORD_ONLY} - set(exclude)
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise TypeError(
            f"unknown hyper-parameter(s) {unknown} for {what}; valid: {sorted(accepted)}"
        )


def build_loss(
    name: str,
    *,
    num_classes: int | None = None,
    embedding_dim: int | None = None,
    classes: Sequence[int] | np.ndarray | Tensor | None = None,
    density: bool = False,
    density_weight: float = 1.0,
    density_target: str = "ema",
    density_options: dict[str, Any] | None = None,
    **hyperparams: Any,
) -> nn.Module:
    """The loss module named ``name`` (a key of ``LOSSES``), optionally density-adaptive.

    ``num_classes``/``embedding_dim``/``classes`` are used by losses with per-class
    parameters (proxy_anchor, daal) and ignored by the others. ``density=True`` wraps the
    loss in ``DensityAdaptive(weight=density_weight, target=density_target,
    **density_options)``. Raises ValueError for an unknown name, TypeError for an unknown
    hyper-parameter.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    factory = LOSSES[name]
    _check_keywords(factory, hyperparams, f"loss {name!r}", exclude=("classes",))
    options = dict(density_options or {})
    # weight and target have their own build_loss arguments (density_weight, density_target).
    _check_keywords(DensityAdaptive, options, "density_options", exclude=("weight", "target"))
    if isinstance(factory, type):
        if embedding_dim is None:
            raise ValueError(f"loss {name!r} has per-class parameters: give embedding_dim")
        for what, value in (("embedding_dim", embedding_dim), ("num_classes", num_classes)):
            # 8.5 failed deep in torch.randn; num_classes=2.5 made 3 classes.
            if value is not None and (not _whole(value) or value < 1):
                raise ValueError(f"{what} must be a whole number >= 1, got {value!r}")
        loss: nn.Module = factory(num_classes, embedding_dim, classes=classes, **hyperparams)
    else:
        loss = PairLoss(factory, **hyperparams)
    if density:
        loss = DensityAdaptive(loss, weight=density_weight, target=density_target, **options)
    return loss


def _whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
