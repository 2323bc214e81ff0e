"""Split a training set over agents (the ``consensus`` engine: every rank trains on its shard).

- ``iid``: a seeded random permutation cut into equal parts (every shard sees every class in
  about the data set's proportions);
- ``label_sorted`` (non-iid): the samples sorted by label (ties in a seeded random order), cut
  into equal contiguous parts, so each agent sees one or two classes only.

Every shard has ``len(labels) // world`` samples (the remainder is dropped), so every rank's
loader has the same number of batches and the ranks stay in step.

Example:
    >>> import numpy as np
    >>> labels = np.repeat(np.arange(4), 3)
    >>> sorted(set(labels[shard_indices(labels, 0, 4, "label_sorted")].tolist()))
    [0]
"""

from __future__ import annotations

import numpy as np

from .sources import DataError

__all__ = ["SPLITS", "shard_indices"]

SPLITS = ("iid", "label_sorted")


def shard_indices(labels: np.ndarray, rank: int, world: int, split: str = "iid", seed: int = 0) -> np.ndarray:
    """Indices (sorted) of agent ``rank``'s shard of a data set with ``labels``, of ``world`` agents."""
    if split not in SPLITS:
        raise DataError(f"unknown data split {split!r}; available: {', '.join(SPLITS)}")
    if not 0 <= rank < world:
        raise DataError(f"rank {rank} is not one of {world} agents")
    n = len(labels) // world
    if n == 0:
        raise DataError(f"{len(labels)} training samples cannot be split over {world} agents")
    order = np.random.default_rng(seed).permutation(len(labels))
    if split == "label_sorted":
        order = order[np.argsort(np.asarray(labels)[order], kind="stable")]
    return np.sort(order[rank * n:(rank + 1) * n])
