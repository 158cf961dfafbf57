"""Balancing adapters under ``torch.distributed``: DDP and FSDP2 (DTensor-sharded factors).

DDP
---
Nothing to do: DDP keeps a full copy of every adapter on each rank, gradients are averaged before
``optimizer.step()``, and the projection is a deterministic function of the factors (same Grams,
same ``torch.linalg`` calls, same rounding), so replicas stay bitwise identical. Build the
:class:`~balora_kernels.BalancedProjector` on the wrapped or unwrapped model on every rank and run it
after every optimizer step (``projector.attach(optimizer)``).

FSDP2
-----
``torch.distributed.fsdp.fully_shard`` turns every parameter into a ``DTensor`` sharded over a 1-D
mesh. The projection needs, per pair, only the two r x r Grams ``G_B = B^T B`` and ``G_A = A A^T``,
and it rescales ``B' = B T`` (row by row) and ``A' = T^-1 A`` (column by column). So when each factor
is split along its *long* dimension -- ``lora_B`` [out, r] along out (``Shard(0)``) and ``lora_A``
[r, in] along in (``Shard(1)``) -- every rank

1. computes the Grams of its local shards (partial sums, float64),
2. takes part in ONE all-reduce (sum) of all partial Grams of all layers, packed in one buffer,
3. computes the same transforms from the same Grams (:func:`~balora_kernels.reference.balancing_transforms`,
   deterministic), and
4. rescales its own shards in place.

No factor is gathered; the traffic is ``2 r^2`` float64 values per adapter (8 KiB per pair at r=16).
:func:`shard_placement_fn` gives FSDP2 that placement and :func:`fully_shard_lora` applies it.

FSDP2's default placement is ``Shard(0)`` for every parameter: right for ``lora_B`` (out is its long
dimension) but it splits ``lora_A`` along r, and both its Gram and ``T^-1 A`` mix rows held by different
ranks. :class:`ShardedProjectionPlan` then all-gathers those factors (one batched all-gather per dtype),
computes their Grams and rescale in full on every rank, and keeps its own rows. Cost per projection:
every rank receives all of ``lora_A`` (``sum r * in`` elements over the layers: the adapter's A
memory, transiently) and repeats the ``r^2 in`` Gram and rescale flops of every layer; the long-dim
placement avoids both.

Replicated factors (``Replicate()`` DTensors, or plain tensors next to a DTensor factor) are used as
full tensors; layouts other than ``Shard``/``Replicate`` on a 1-D mesh (HSDP's 2-D mesh, tensor
parallel, strided shards) fall back to ``full_tensor()`` of both factors and a local slice back.

Mixed precision: FSDP2 keeps the sharded parameters in their original dtype (float32 adapters stay
float32 masters) and all-gathers ``MixedPrecisionPolicy.param_dtype`` copies for each forward. The
projection writes the sharded parameters -- the values the optimizer owns -- so the next all-gather
carries the projected values. Build the projector after ``fully_shard`` (it must hold the sharded
parameters) and run it on every rank, after the optimizer step, with the same list of pairs.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import reference
from ..ops.projection import ProjectionStats

__all__ = ["ShardedProjectionPlan", "fully_shard_lora", "has_dtensor", "is_dtensor", "shard_placement_fn"]


_DTENSOR = []  # [DTensor or None], filled on first use (is_dtensor runs on every patched forward)


def _dtensor_cls():
    if not _DTENSOR:
        cls = None
        if torch.distributed.is_available():
            try:
                from torch.distributed.tensor import DTensor as cls
            except ImportError:  # pragma: no cover - torch without DTensor
                cls = None
        _DTENSOR.append(cls)
    return _DTENSOR[0]


def is_dtensor(t) -> bool:
    """True for a ``DTensor`` (an FSDP2 sharded parameter is one)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def has_dtensor(pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """True when any factor of ``pairs`` is a DTensor (then :class:`ShardedProjectionPlan` runs)."""
    if not torch.distributed.is_available():
        return False
    return any(is_dtensor(A) or is_dtensor(B) for A, B in pairs)


# --------------------------------------------------------------------------------------------
# How each factor is held on this rank
# --------------------------------------------------------------------------------------------
# "long":    Shard(long dim) on a 1-D mesh -- local partial Gram, local rescale, nothing gathered.
# "full":    a plain tensor or Replicate() -- the whole factor is here.
# "gather":  Shard(other dim) on a 1-D mesh -- batched all-gather, full math, keep own slice.
# "generic": anything else (n-D mesh, strided or partial placements) -- full_tensor(), local slice.
_LONG_DIM = {"A": 1, "B": 0}   # lora_A [r, in] is long along in; lora_B [out, r] along out


def _kind(t: torch.Tensor, role: str) -> str:
    if not is_dtensor(t):
        return "full"
    from torch.distributed.tensor import Replicate, Shard
    if t.device_mesh.ndim != 1:
        return "generic"
    (pl,) = t.placements
    if isinstance(pl, Replicate):
        return "full"
    if type(pl) is Shard:
        return "long" if pl.dim == _LONG_DIM[role] else "gather"
    return "generic"


def _chunk_bounds(n: int, world: int, rank: int) -> Tuple[int, int]:
    """The slice of ``n`` rows that ``Shard`` gives ``rank`` (torch.chunk's split, empty at the end)."""
    c = -(-n // world)
    return min(rank * c, n), min((rank + 1) * c, n)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _mesh_key(mesh) -> tuple:
    return (mesh.device_type, tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape))


class _Factor:
    """One factor of one pair: its kind, its full (or local) value for this run, where it goes back."""

    __slots__ = ("param", "role", "kind", "mesh")

    def __init__(self, param: torch.Tensor, role: str):
        self.param, self.role = param, role
        self.kind = _kind(param, role)
        self.mesh = param.device_mesh if is_dtensor(param) else None


class ShardedProjectionPlan:
    """Projection of pairs whose factors are DTensors (FSDP2), with one all-reduce of the Grams.

    Every rank must build the plan over the same pairs in the same order and call :meth:`run`
    together (it is a collective). Plain-tensor pairs in the list are projected locally by the
    ordinary plan. See the module docstring for the algorithm and the cost of each placement.
    """

    backend = "sharded"

    def __init__(self, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]]):
        from .. import functional
        self.pairs = list(pairs)
        dt = [i for i, (A, B) in enumerate(self.pairs) if is_dtensor(A) or is_dtensor(B)]
        plain = [i for i in range(len(self.pairs)) if i not in set(dt)]
        self._plain_plan = functional.make_projection_plan([self.pairs[i] for i in plain]) if plain else None
        self._entries = [(i, _Factor(self.pairs[i][0], "A"), _Factor(self.pairs[i][1], "B")) for i in dt]
        # Each pair works on the 1-D mesh of its DTensor factors. A pair with a "generic" factor, or
        # with factors on different meshes, is gathered whole (correct, slower).
        self._meshes: Dict[tuple, object] = {}
        self._entry_mesh: List[Optional[tuple]] = []
        for _, fa, fb in self._entries:
            ms = {_mesh_key(f.param.device_mesh): f.param.device_mesh for f in (fa, fb) if is_dtensor(f.param)}
            if len(ms) != 1 or "generic" in (fa.kind, fb.kind):
                fa.kind = fb.kind = "generic"
                self._entry_mesh.append(None)
            else:
                (key, mesh), = ms.items()
                self._meshes[key] = mesh
                self._entry_mesh.append(key)
        self._signature = self._sig()

    def _sig(self):
        """Shapes, dtypes, devices and placements of the DTensor pairs (the plain plan checks its own pairs)."""
        out = []
        for i, _, _ in self._entries:
            out.append(tuple((t.shape, t.dtype, t.device, getattr(t, "placements", None)) for t in self.pairs[i]))
        return out

    def is_stale(self) -> bool:
        """Shapes, dtypes, devices or placements changed, or the plain pairs' plan is stale (it holds their
        addresses and may replay a CUDA graph into them)."""
        return self._sig() != self._signature or (self._plain_plan is not None and self._plain_plan.is_stale())

    @property
    def kinds(self) -> List[Tuple[str, str]]:
        """``(kind of lora_A, kind of lora_B)`` per DTensor pair: long / full / gather / generic."""
        return [(fa.kind, fb.kind) for _, fa, fb in self._entries]

    # ---- gathering ---------------------------------------------------------------------------
    def _gather_shard(self, factors: List[_Factor]) -> List[torch.Tensor]:
        """Full values of 1-D-mesh ``Shard(d)`` factors: one all-gather per (mesh, dtype), padded chunks."""
        import torch.distributed as dist
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        out: List[Optional[torch.Tensor]] = [None] * len(factors)
        by_key: Dict[tuple, List[int]] = {}
        for j, f in enumerate(factors):
            by_key.setdefault((_mesh_key(f.mesh), f.param.dtype), []).append(j)
        for (mkey, _), idx in by_key.items():
            group = self._meshes[mkey].get_group()
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            pieces, sizes = [], []
            for j in idx:
                p = factors[j].param
                d = p.placements[0].dim
                n = p.shape[d]
                c = -(-n // world)
                loc = p.to_local()
                lo, hi = _chunk_bounds(n, world, rank)
                if loc.shape[d] != hi - lo:
                    raise RuntimeError(f"ShardedProjectionPlan: unexpected local shard {tuple(loc.shape)} of "
                                       f"{tuple(p.shape)} on rank {rank} (Shard({d}) over {world} ranks)")
                pad_shape = list(loc.shape)
                pad_shape[d] = c - loc.shape[d]
                padded = torch.cat([loc, loc.new_zeros(pad_shape)], d) if pad_shape[d] else loc
                pieces.append(padded.movedim(d, 0).reshape(-1))
                sizes.append(pieces[-1].numel())
            buf = torch.cat(pieces)
            gathered = buf.new_empty(world * buf.numel())
            all_gather(gathered, buf, group=group)
            gathered = gathered.view(world, buf.numel())
            off = 0
            for j, s in zip(idx, sizes):
                p = factors[j].param
                d = p.placements[0].dim
                n = p.shape[d]
                c = -(-n // world)
                moved = list(p.shape)
                moved.insert(0, moved.pop(d))
                moved[0] = c
                blocks = gathered[:, off:off + s].reshape(world * c, *moved[1:])[:n]
                out[j] = blocks.movedim(0, d).contiguous()
                off += s
        return out

    def _full_values(self) -> Dict[int, torch.Tensor]:
        """``id(factor) -> full tensor`` for every factor that is not long-sharded."""
        full: Dict[int, torch.Tensor] = {}
        to_gather = []
        for _, fa, fb in self._entries:
            for f in (fa, fb):
                if f.kind == "full":
                    full[id(f)] = _local(f.param)
                elif f.kind == "gather":
                    to_gather.append(f)
                elif f.kind == "generic":
                    full[id(f)] = f.param.full_tensor() if is_dtensor(f.param) else f.param
        if to_gather:
            for f, v in zip(to_gather, self._gather_shard(to_gather)):
                full[id(f)] = v
        return full

    @staticmethod
    def _own_slice(f: _Factor, new_full: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``new_full`` in ``f``'s layout (no communication)."""
        if not is_dtensor(f.param):
            return new_full
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        if f.param.device_mesh.ndim == 1:
            (pl,) = f.param.placements
            if isinstance(pl, Replicate):
                return new_full
            if type(pl) is Shard:
                mesh = f.param.device_mesh
                lo, hi = _chunk_bounds(new_full.shape[pl.dim], mesh.size(), mesh.get_local_rank())
                return new_full.narrow(pl.dim, lo, hi - lo)
        return distribute_tensor(new_full, f.param.device_mesh, f.param.placements, src_data_rank=None).to_local()

    # ---- the projection ----------------------------------------------------------------------
    @torch.no_grad()
    def run(self, mode: str = "nearest") -> ProjectionStats:
        import torch.distributed as dist
        full = self._full_values()

        # 1. Grams: complete ones (from full factors) and partial ones (long-sharded) in pair order.
        n = len(self._entries)
        G: List[List[Optional[torch.Tensor]]] = [[None, None] for _ in range(n)]   # (G_B, G_A)
        partial_slots = []
        for k, (_, fa, fb) in enumerate(self._entries):
            a = full.get(id(fa), _local(fa.param)).to(torch.float64)
            b = full.get(id(fb), _local(fb.param)).to(torch.float64)
            G[k][0] = b.transpose(-1, -2) @ b
            G[k][1] = a @ a.transpose(-1, -2)
            if fb.kind == "long":
                partial_slots.append((k, 0))
            if fa.kind == "long":
                partial_slots.append((k, 1))
        # 2. ONE all-reduce over every partial Gram of every layer (per mesh; FSDP2 uses one).
        for mkey, mesh in self._meshes.items():
            slots = [(k, s) for k, s in partial_slots if self._entry_mesh[k] == mkey]
            if not slots:
                continue
            buf = torch.cat([G[k][s].reshape(-1) for k, s in slots])
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=mesh.get_group())
            off = 0
            for k, s in slots:
                r = G[k][s].shape[-1]
                G[k][s] = buf[off:off + r * r].view(r, r)
                off += r * r

        # 3. Transforms, batched by r; identical on every rank (same Grams, same calls).
        by_r: Dict[int, List[int]] = {}
        for k in range(n):
            by_r.setdefault(G[k][0].shape[-1], []).append(k)
        trans: Dict[int, Tuple[torch.Tensor, torch.Tensor, bool]] = {}
        all_t = []
        for r, ks in by_r.items():
            eps_f = torch.tensor([reference.factor_eps(self._entries[k][1].param, self._entries[k][2].param)
                                  for k in ks], dtype=torch.float64, device=G[ks[0]][0].device)
            t = reference.balancing_transforms(torch.stack([G[k][0] for k in ks]),
                                               torch.stack([G[k][1] for k in ks]), mode, eps_f=eps_f)
            all_t.append(t)
            skip = (t.nonfinite | t.zero).tolist()
            for j, k in enumerate(ks):
                trans[k] = (t.T[j], t.T_inv[j], skip[j])

        # 4. Rescale: compute every new local shard first, then write (an error writes nothing).
        writes = []
        for k, (_, fa, fb) in enumerate(self._entries):
            T, T_inv, skip = trans[k]
            if skip:
                continue
            a_src = full.get(id(fa), _local(fa.param))
            b_src = full.get(id(fb), _local(fb.param))
            new_a = (T_inv @ a_src.to(torch.float64)).to(fa.param.dtype)
            new_b = (b_src.to(torch.float64) @ T).to(fb.param.dtype)
            if fa.kind != "long":
                new_a = self._own_slice(fa, new_a)
            if fb.kind != "long":
                new_b = self._own_slice(fb, new_b)
            writes.append((_local(fa.param), new_a))
            writes.append((_local(fb.param), new_b))
        for dst, src in writes:
            dst.copy_(src)
        device = _local(self._entries[0][1].param).device if self._entries else torch.device("cpu")
        stats = ProjectionStats.from_transforms(all_t, device)
        if self._plain_plan is not None:
            stats = _merge_stats(stats, self._plain_plan.run(mode))
        return stats


def _merge_stats(a: ProjectionStats, b: ProjectionStats) -> ProjectionStats:
    dev = a.pairs.device
    fields = {}
    for k in a.__dataclass_fields__:
        x, y = getattr(a, k), getattr(b, k).to(dev)
        fields[k] = torch.maximum(x, y) if k.startswith("gap") else x + y
    return ProjectionStats(**fields)


# --------------------------------------------------------------------------------------------
# FSDP2 setup
# --------------------------------------------------------------------------------------------
def shard_placement_fn(model: nn.Module, world_size: Optional[int] = None
                       ) -> Callable[[nn.Parameter], Optional[object]]:
    """An FSDP2 ``shard_placement_fn`` that shards each adapter along its long dimension.

    ``lora_B`` [out, r] -> ``Shard(0)`` (out), ``lora_A`` [r, in] -> ``Shard(1)`` (in); every other
    parameter -> FSDP2's default (``Shard(0)``). FSDP2 refuses uneven shards on a dimension other
    than 0, so an ``lora_A`` whose ``in`` is not a multiple of ``world_size`` (default: the default
    group's size) keeps ``Shard(0)`` and is gathered at projection time. Build it before
    ``fully_shard`` (it recognises the parameters by identity).
    """
    from torch.distributed.tensor import Shard

    from ..projector import find_adapters
    if world_size is None:
        import torch.distributed as dist
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    place: Dict[int, object] = {}
    for _, A, B in find_adapters(model):
        place[id(B)] = Shard(0)
        if A.shape[1] % world_size == 0:
            place[id(A)] = Shard(1)

    def fn(param: nn.Parameter):
        return place.get(id(param))
    return fn


def fully_shard_lora(model: nn.Module, layers: Iterable[nn.Module] = (), *, mesh=None,
                     long_dim_placement: bool = True, **fsdp_kwargs) -> nn.Module:
    """The recommended FSDP2 setup: ``fully_shard`` each of ``layers``, then ``model``, with every
    adapter sharded along its long dimension (:func:`shard_placement_fn`). Returns ``model``.

    ``layers``: the blocks to shard separately (e.g. ``model.base_model.model.model.layers`` of a
    PEFT Llama); ``fsdp_kwargs`` go to ``fully_shard`` (``mp_policy``, ``reshard_after_forward``,
    ...); ``long_dim_placement=False`` keeps FSDP2's default ``Shard(0)`` (lora_A is then gathered at
    each projection). Build the projector afterwards (``to_balora(model)`` or
    ``BalancedProjector(model)``) so that it holds the sharded parameters.
    """
    from torch.distributed.fsdp import fully_shard
    if long_dim_placement:
        world = mesh.size() if mesh is not None else None
        fsdp_kwargs["shard_placement_fn"] = shard_placement_fn(model, world)
    for layer in layers:
        fully_shard(layer, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model
