"""One rank of the multi-process tests in test_distributed.py (launched like torchrun: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment). Runs every scenario and writes its measurements to
``<out>/rank<r>.json``; the test file asserts on them. Any exception ends the process at once
(``os._exit``) so the peer fails fast instead of waiting in a collective.

    python tests/dist_worker.py --backend gloo|nccl --out DIR
"""
import argparse
import copy
import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from balora_kernels import functional, reference  # noqa: E402
from balora_kernels.integrations.distributed import ShardedProjectionPlan, fully_shard_lora  # noqa: E402
from balora_kernels.integrations.peft import to_balora  # noqa: E402

VOCAB = 96


def tiny_peft(seed, device, r=4):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.to(device)


def batch(seed, device, rows=2, seq=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (rows, seq), generator=g).to(device)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def max_rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def oracle_project(named_pairs):
    """reference.balance on each full pair, written in place; returns how many pairs changed."""
    n = 0
    for _, A, B in named_pairs:
        A2, B2 = reference.balance(A, B)
        n += not (torch.equal(A2, A) and torch.equal(B2, B))
        A.copy_(A2)
        B.copy_(B2)
    return n


class Counter:
    """Counts all_reduce / all-gather calls made through torch.distributed while active."""

    names = tuple(n for n in ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather", "broadcast")
                  if hasattr(dist, n))

    def __enter__(self):
        self.counts = {n: 0 for n in self.names}
        self.orig = {n: getattr(dist, n) for n in self.names}
        for n in self.names:
            def wrap(*a, _n=n, **k):
                self.counts[_n] += 1
                return self.orig[_n](*a, **k)
            setattr(dist, n, wrap)
        return self

    def __exit__(self, *exc):
        for n, f in self.orig.items():
            setattr(dist, n, f)


# --------------------------------------------------------------------------------------------
def scenario_ddp(rank, world, device):
    """50 steps of DDP with a projection after each: replicas must stay bitwise identical."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = tiny_peft(0, device)
    balora = to_balora(model)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    balora.projector.attach(opt)
    init = flat_params(model)
    for step in range(50):
        x = batch(1000 * step + rank, device)           # each rank its own data
        ddp(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    mine = flat_params(model)
    both = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(both, mine)
    st = balora.projector.last_stats.as_dict()
    return {"bitwise_equal": all(torch.equal(both[0], t) for t in both[1:]),
            "changed": not torch.equal(init, mine), "projections": balora.projector.projections,
            "gap_after": st["gap_after"], "gap_before": st["gap_before"], "numel": mine.numel()}


def _shard(model, placement, mesh, **kw):
    layers = model.base_model.model.model.layers
    fully_shard_lora(model, layers, mesh=mesh, long_dim_placement=(placement == "long"), **kw)


def scenario_fsdp(rank, world, device, placement):
    """One projection of FSDP2-sharded adapters vs the unsharded projection, then 3 SGD steps."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,))
    model = tiny_peft(1, device)
    ref = copy.deepcopy(model)
    # The unsharded oracle: plain PEFT forwards and reference.balance on every full pair (whatever
    # backend the ordinary plan would pick on this device).
    ref_pairs = to_balora(ref, patch=False).projector.named_pairs
    _shard(model, placement, mesh)
    balora = to_balora(model)
    proj = balora.projector
    plan = proj._current_plan()
    kinds = sorted(set(plan.kinds)) if isinstance(plan, ShardedProjectionPlan) else ["not sharded"]
    with Counter() as c:
        st = proj.project().as_dict()
    ref_projected = oracle_project(ref_pairs)
    err = max(max_rel(full(A), rA) for (_, A, _), (_, rA, _) in zip(proj.named_pairs, ref_pairs))
    err = max(err, max(max_rel(full(B), rB) for (_, _, B), (_, _, rB) in zip(proj.named_pairs, ref_pairs)))
    out = {"plan": type(plan).__name__, "kinds": kinds, "collectives": c.counts, "proj_err": err,
           "projected": st["projected"], "ref_projected": ref_projected, "gap_after": st["gap_after"],
           "local_shapes": sorted({(tuple(A.to_local().shape), tuple(B.to_local().shape))
                                   for _, A, B in proj.named_pairs})}

    # Training: FSDP2 (each rank half the batch) vs one process on the whole batch.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05)
    proj.attach(opt)
    calls = {"n": 0}
    orig = functional.lora_linear

    def counted(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)
    functional.lora_linear = counted
    try:
        for step in range(3):
            xs = [batch(77 * step + r, device) for r in range(world)]
            model(input_ids=xs[rank], labels=xs[rank]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            xa = torch.cat(xs)
            ref(input_ids=xa, labels=xa).loss.backward()
            ref_opt.step()
            oracle_project(ref_pairs)
            ref_opt.zero_grad(set_to_none=True)
    finally:
        functional.lora_linear = orig
    terr = 0.0
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            terr = max(terr, max_rel(full(p), q))
    out.update(train_err=terr, fast_path_calls=calls["n"], train_projections=proj.projections)
    return out


def scenario_fsdp_mixed_precision(rank, world, device):
    """MixedPrecisionPolicy(bf16): the fp32 sharded masters are projected; the next forward's
    bf16 all-gathered copy carries the projected values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    mesh = init_device_mesh(device.type, (world,))
    model = tiny_peft(2, device)
    _shard(model, "long", mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    proj = to_balora(model).projector
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = {}
    h = q_proj.lora_A["default"].register_forward_pre_hook(
        lambda m, a: seen.__setitem__("A", m.weight.detach().clone()))
    dtypes = sorted({str(A.dtype) for _, A, _ in proj.named_pairs})
    worst_gap = worst_prod = 0.0
    carried = True
    for step in range(3):
        x = batch(55 * step + rank, device)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        prods = [(full(B).double() @ full(A).double()) for _, A, B in proj.named_pairs]
        proj.project()
        for (_, A, B), pr in zip(proj.named_pairs, prods):
            fa, fb = full(A), full(B)
            worst_prod = max(worst_prod, max_rel(fb.double() @ fa.double(), pr))
            worst_gap = max(worst_gap, reference.balance_gap(*reference.grams(fa, fb)).item())
        a_now = full(q_proj.lora_A["default"].weight)
        model(input_ids=x)                          # the next forward all-gathers bf16 copies
        carried &= seen["A"].dtype == torch.bfloat16 and torch.equal(seen["A"], a_now.to(torch.bfloat16))
    h.remove()
    return {"master_dtypes": dtypes, "gap_after": worst_gap, "product_err": worst_prod, "bf16_copy_carries": carried}


def scenario_layouts(rank, world, device):
    """DTensor pairs in every layout the plan handles (uneven shards, replicate, a 2-D mesh, a plain
    pair), projected with the sharded plan vs the reference on the full tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh(device.type, (world,))
    mesh2 = init_device_mesh(device.type, (1, world), mesh_dim_names=("rep", "shard"))
    g = torch.Generator().manual_seed(5)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    specs = [  # (A shape, A placement, B shape, B placement, mesh)
        ((3, 10), [Shard(0)], (7, 3), [Shard(0)], mesh),          # r split unevenly, out uneven
        ((5, 12), [Shard(1)], (9, 5), [Replicate()], mesh),
        ((5, 12), [Shard(1)], (9, 5), [Shard(1)], mesh),          # B split along r: gathered
        ((4, 8), [Replicate(), Shard(1)], (6, 4), [Replicate(), Shard(0)], mesh2),   # generic
    ]
    full_pairs, pairs = [], []
    for sa, pa, sb, pb, m in specs:
        A, B = rnd(*sa), rnd(*sb)
        full_pairs.append((A.clone(), B.clone()))
        pairs.append((distribute_tensor(A, m, pa), distribute_tensor(B, m, pb)))
    plainA, plainB = rnd(4, 6), rnd(5, 4)
    full_pairs.append((plainA.clone(), plainB.clone()))
    pairs.append((plainA, plainB))
    zeroA = rnd(2, 8)
    zdt = (distribute_tensor(zeroA, mesh, [Shard(1)]),
           distribute_tensor(torch.zeros(6, 2, device=device), mesh, [Shard(0)]))
    full_pairs.append((zeroA.clone(), torch.zeros(6, 2, device=device)))
    pairs.append(zdt)
    plan = functional.make_projection_plan(pairs)
    st = plan.run("nearest").as_dict()
    err = 0.0
    for (A, B), (fA, fB) in zip(pairs, full_pairs):
        rA, rB = reference.balance(fA, fB)
        err = max(err, max_rel(full(A), rA), max_rel(full(B), rB))
    return {"plan": type(plan).__name__, "kinds": [list(k) for k in plan.kinds], "err": err, "stats": st}


# --------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90),
                            **({"device_id": device} if device.type == "cuda" else {}))
    results = {"backend": args.backend, "torch": torch.__version__}
    try:
        results["ddp"] = scenario_ddp(rank, world, device)
        results["fsdp_long"] = scenario_fsdp(rank, world, device, "long")
        results["fsdp_default"] = scenario_fsdp(rank, world, device, "default")
        results["fsdp_mp"] = scenario_fsdp_mixed_precision(rank, world, device)
        results["layouts"] = scenario_layouts(rank, world, device)
    except BaseException:
        with open(os.path.join(args.out, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    # Exit without the interpreter's teardown: torch's process-group threads destroyed there have aborted a
    # finished worker ("terminate called without an active exception", return code -6, seen once in CI on
    # rank 0) after its results were written and the barrier passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
