import numpy as np
import pytest
import torch

from dmlkit.losses.density import class_statistics


def _reference(z: np.ndarray, y: np.ndarray, eps: float = 1e-8):
    classes = sorted(set(y.tolist()))
    mu = {c: z[y == c].mean(0) for c in classes}
    out = {}
    for c in classes:
        members = z[y == c]
        spread = np.mean([np.linalg.norm(v - mu[c]) for v in members]) if len(members) > 1 else 0
        others = [np.linalg.norm(mu[c] - mu[o]) for o in classes if o != c]
        sep = min(others) if others else np.inf
        valid = len(members) >= 2 and np.isfinite(sep)
        out[c] = (spread, sep, spread / (sep + eps) if valid else 0.0, valid)
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("block_size", [2, 4096])
def test_class_statistics_matches_float64_loop(seed, block_size):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(23, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([7, 7, 7, 101, 101, 3, 3, 3, 3, 55] + [9] * 13)
    stats = class_statistics(z, y, block_size=block_size)
    ref = _reference(z.numpy(), y.numpy())
    assert stats.classes.tolist() == sorted(ref)
    for row, c in enumerate(stats.classes.tolist()):
        spread, sep, rel, valid = ref[c]
        assert stats.valid[row].item() == valid
        assert stats.spread[row].item() == pytest.approx(spread, rel=1e-5)
        assert stats.separation[row].item() == pytest.approx(sep, rel=1e-5)
        assert stats.relative_density[row].item() == pytest.approx(rel, rel=1e-5)


def test_single_class_is_not_valid_and_gradients_are_finite():
    z = torch.zeros(4, 3, requires_grad=True)  # every sample on its centroid
    stats = class_statistics(z, torch.zeros(4, dtype=torch.long))
    assert not stats.valid.any()
    stats.spread.sum().backward()
    assert torch.isfinite(z.grad).all()
