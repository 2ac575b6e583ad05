"""The enumerations of include/snapshotd.h that are neither error codes nor element types."""

from __future__ import annotations

import enum


class Kind(enum.IntEnum):
    """What a tensor is (``snapshotd_kind``), for CheckFree recovery of a lost pipeline stage.

    Parameters are averaged from (or copied from) the neighbouring stages'
    tensors of the same stage-local name, optimizer state restarts at zero,
    RNG and extra state come from the neighbour used. ``CARRIED`` marks a copy
    of a tensor another stage owns, saved under the owner's name (the
    embedding the second stage carries for the first, the LM head the
    second-to-last carries for the last)."""

    PARAMETER = 0
    OPTIMIZER = 1
    RNG = 2
    EXTRA = 3
    CARRIED = 4


class ReconstructionMethod(enum.IntEnum):
    """How a restored shard came to be (``snapshotd_reconstruction_method``)."""

    EXACT = 0
    CHECKFREE_AVERAGE = 1
    CHECKFREE_COPY = 2

    @property
    def label(self) -> str:
        """``"exact"``, ``"checkfree-average"``, ``"checkfree-copy"``."""
        return self.name.lower().replace("_", "-")
