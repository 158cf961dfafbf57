"""What users run without this package: the baselines every benchmark measures beside our ops.

* :func:`paper_project` — the paper's ``ProjectionCallback`` math for one module (vcastin/balora,
  callbacks.py; re-implemented from its formula, as ``../shared/anchors/anchor_bench.py`` does):
  polar parts of the thin SVDs of A and B, then the SVD of the r x r core;
* :func:`batched_project` — plain PyTorch batched by shape: Grams, float64 ``torch.linalg.eigh`` of
  ``G_B^1/2 G_A G_B^1/2``, rescale (the anchors' "plain batched" baseline; no degenerate-pair policy);
* :func:`peft_lora_layer` — PEFT's LoRA ``Linear`` (the layer PEFT users train), around a linear layer.

Neither is used by the package's own projection; the test suite uses :func:`paper_project` as the
paper's oracle.
"""
from __future__ import annotations

import torch


def _upcast(*ts):
    """16-bit factors in float32 (``torch.linalg`` takes no bfloat16 / float16 on the GPU), others as given."""
    return tuple(t.float() if t.dtype in (torch.bfloat16, torch.float16) else t for t in ts)


def paper_project(A: torch.Tensor, B: torch.Tensor):
    """The paper's SVD-aligned balanced pair ``(A', B')`` for one module, A [r, in], B [out, r]. 16-bit factors
    are projected in float32 and the pair returned in their dtype (the SVDs take no 16-bit input)."""
    A32, B32 = _upcast(A, B)
    if A32 is not A or B32 is not B:
        A2, B2 = paper_project(A32, B32)
        return A2.to(A.dtype), B2.to(B.dtype)
    UA, DA, VA = torch.linalg.svd(A, full_matrices=False)
    SA, RA = (UA * DA) @ UA.T, UA @ VA
    UB, DB, VB = torch.linalg.svd(B, full_matrices=False)
    SB, RB = (VB.T * DB) @ VB, UB @ VB
    U, S, V = torch.linalg.svd(SB @ SA)
    s = S.sqrt()
    return (s[:, None] * V) @ RA, RB @ (U * s)


def batched_project(groups):
    """``[(A' [G, r, in], B' [G, out, r])]`` for stacked groups ``[(A [G, r, in], B [G, out, r])]`` (16-bit
    factors: Grams and rescale in float32, results in their dtype)."""
    outs = []
    for A0, B0 in groups:
        A, B = _upcast(A0, B0)
        GB, GA = B.transpose(1, 2) @ B, A @ A.transpose(1, 2)
        d, Q = torch.linalg.eigh(GB.double())
        d = d.clamp_min(0)
        sq = (Q * d.sqrt()[:, None, :]) @ Q.transpose(1, 2)
        isq = (Q * d.clamp_min(1e-30).rsqrt()[:, None, :]) @ Q.transpose(1, 2)
        lam, V = torch.linalg.eigh(sq @ GA.double() @ sq)
        sig = lam.clamp_min(0).sqrt()                      # singular values of B A
        T = isq @ V * sig.sqrt()[:, None, :]
        Tinv = sig.clamp_min(1e-30).rsqrt()[:, :, None] * (V.transpose(1, 2) @ sq)
        outs.append(((Tinv.to(A.dtype) @ A).to(A0.dtype), (B @ T.to(B.dtype)).to(B0.dtype)))
    return outs


class OneLinear(torch.nn.Module):
    """A module holding one linear layer as ``lin`` (what ``get_peft_model`` wraps to give one LoRA layer)."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def peft_lora_layer(base: "torch.nn.Linear", lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float):
    """PEFT's LoRA ``Linear`` wrapping ``base`` (``get_peft_model`` on a one-layer module), its adapters
    set to copies of ``lora_A`` [r, in] / ``lora_B`` [out, r] and ``lora_alpha = scaling * r``; the
    adapters keep their dtype (``autocast_adapter_dtype=False``). Raises ImportError without peft."""
    from peft import LoraConfig, get_peft_model

    r = lora_A.shape[0]
    model = get_peft_model(OneLinear(base), LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["lin"],
                                                 lora_dropout=0.0), autocast_adapter_dtype=False)
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    return layer
