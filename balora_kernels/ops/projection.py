"""Batched balancing of many LoRA pairs: grouped Grams, r x r transforms, grouped rescale.

A *plan* is built once for a fixed list of ``(lora_A, lora_B)`` parameters and run after every
optimizer step. It writes the parameters in place and returns :class:`ProjectionStats` whose
counters live on the device until they are read.

``TorchProjectionPlan`` is the plain-PyTorch backend (CPU and any device): pairs are grouped by
(shapes, dtypes, device), each group stacked once per call, its Grams and transforms computed
batched with :mod:`balora_kernels.reference`, and the results copied back with one foreach copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .. import reference

Pair = Tuple[torch.Tensor, torch.Tensor]   # (lora_A [r, in], lora_B [out, r])


@dataclass
class ProjectionStats:
    """Counters of one projection, as 0-d device tensors; nothing is read until asked.

    ``pairs``: pairs seen; ``projected``: pairs rebalanced; ``skipped_nonfinite`` / ``skipped_zero``:
    pairs left untouched for NaN/Inf or a zero product; ``rank_deficient``: projected pairs with
    fewer than r live components; ``gap_before`` / ``gap_after``: the largest relative balance gap
    ``||G_B - G_A||_F / max(||G_B||_F, ||G_A||_F)`` over projected pairs (computed from the Grams
    and the transforms).
    """
    pairs: torch.Tensor
    projected: torch.Tensor
    skipped_nonfinite: torch.Tensor
    skipped_zero: torch.Tensor
    rank_deficient: torch.Tensor
    gap_before: torch.Tensor
    gap_after: torch.Tensor

    def as_dict(self) -> Dict[str, float]:
        """Read the counters (one device-to-host copy)."""
        keys = list(self.__dataclass_fields__)
        vals = torch.stack([getattr(self, k).to(torch.float64) for k in keys]).cpu().tolist()
        return {k: (int(v) if k not in ("gap_before", "gap_after") else v) for k, v in zip(keys, vals)}

    def __repr__(self) -> str:
        return "ProjectionStats(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"

    @staticmethod
    def from_transforms(ts: Sequence[reference.Transforms], device) -> "ProjectionStats":
        """Reduce per-pair status of one or more groups of transforms into counters."""
        if not ts:
            z = torch.zeros((), dtype=torch.int64, device=device)
            zf = torch.zeros((), dtype=torch.float64, device=device)
            return ProjectionStats(z, z, z, z, z, zf, zf)
        cat = lambda f: torch.cat([getattr(t, f).reshape(-1) for t in ts]).to(device)  # noqa: E731
        nonfinite, zero, rank = cat("nonfinite"), cat("zero"), cat("rank")
        r = torch.cat([torch.full_like(t.rank.reshape(-1), t.T.shape[-1]) for t in ts]).to(device)
        done = ~(nonfinite | zero)
        zero_f = torch.zeros((), dtype=torch.float64, device=device)
        gmax = lambda g: torch.where(done, g, 0).max() if g.numel() else zero_f  # noqa: E731
        return ProjectionStats(
            pairs=torch.tensor(nonfinite.numel(), device=device),
            projected=done.sum(),
            skipped_nonfinite=nonfinite.sum(),
            skipped_zero=zero.sum(),
            rank_deficient=(done & (rank < r)).sum(),
            gap_before=gmax(cat("gap_before")),
            gap_after=gmax(cat("gap_after")),
        )


class PackedProjectionStats(ProjectionStats):
    """:class:`ProjectionStats` over one float64 device buffer ``[7]`` (the five counts, exact in float64,
    then the two gaps), as the grouped kernels write it. Fields are made when first read; ``as_dict``
    copies the buffer once."""

    def __init__(self, packed: torch.Tensor):   # noqa: the dataclass fields are read through __getattr__
        object.__setattr__(self, "_packed", packed)

    def __getattr__(self, name):   # only for fields not read yet: the value is kept
        keys = tuple(ProjectionStats.__dataclass_fields__)
        if name not in keys:
            raise AttributeError(name)
        v = self._packed[keys.index(name)]
        v = v if name.startswith("gap_") else v.to(torch.int64)
        object.__setattr__(self, name, v)
        return v

    def as_dict(self) -> Dict[str, float]:
        keys = tuple(ProjectionStats.__dataclass_fields__)
        vals = self._packed.cpu().tolist()
        return {k: (int(v) if not k.startswith("gap_") else v) for k, v in zip(keys, vals)}


def group_pairs(pairs: Sequence[Pair]) -> List[List[int]]:
    """Indices of pairs grouped by (A shape, B shape, dtypes, device), in first-seen order."""
    groups: Dict[tuple, List[int]] = {}
    for i, (A, B) in enumerate(pairs):
        key = (tuple(A.shape), tuple(B.shape), A.dtype, B.dtype, A.device)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _signature(pairs: Sequence[Pair]):
    return [(A.shape, A.dtype, A.device, B.shape, B.dtype) for A, B in pairs]


class TorchProjectionPlan:
    """Plain-PyTorch batched projection (the fallback on every device)."""

    backend = "torch"

    def __init__(self, pairs: Sequence[Pair]):
        self.pairs = list(pairs)
        self.groups = [([self.pairs[i][0] for i in g], [self.pairs[i][1] for i in g])
                       for g in group_pairs(self.pairs)]

        self._signature = _signature(self.pairs)

    def is_stale(self) -> bool:
        """True when a parameter changed shape, dtype or device (``model.to(...)``): regroup."""
        return _signature(self.pairs) != self._signature

    @torch.no_grad()
    def run(self, mode: str = "nearest") -> ProjectionStats:
        # Compute every group before writing any, so an error leaves no pair half-projected.
        results = []
        for As, Bs in self.groups:
            A, B = torch.stack(As), torch.stack(Bs)
            t = reference.balancing_transforms(*reference.grams(A, B), mode,
                                               factor_dtypes=(A.dtype, B.dtype))
            results.append((As, Bs, A, B, *reference.apply_transforms(A, B, t), t))
        try:
            for As, Bs, _, _, A2, B2, _ in results:
                torch._foreach_copy_(As, list(A2.unbind(0)))
                torch._foreach_copy_(Bs, list(B2.unbind(0)))
        except BaseException:
            # (check_pairs refuses the parameters that cannot be written; should a copy fail all the same, every
            # pair gets its values back: the stacked copies above are the originals)
            for As, Bs, A, B, _, _, _ in results:
                for dst, src in zip(As + Bs, list(A.unbind(0)) + list(B.unbind(0))):
                    try:
                        dst.copy_(src)
                    except Exception:  # noqa: BLE001 -- the tensor that refused the write keeps its values
                        pass
            raise
        device = self.pairs[0][0].device if self.pairs else torch.device("cpu")
        return ProjectionStats.from_transforms([res[-1] for res in results], device)
