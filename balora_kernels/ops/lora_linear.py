"""The LoRA linear op: ``y = x W^T + b + s ((x * mask) A^T) B^T`` with its own backward.

Only ``x``, ``u = x_l A^T`` [N, r] and the dropout mask are saved for backward (W, A, B by
reference), so the adapted layer keeps the memory of a frozen linear plus N x r.
"""
from __future__ import annotations

import torch

from .. import reference


class LoRALinearFunction(torch.autograd.Function):
    """Autograd function over 2-D ``x`` [N, in]; the math is :mod:`balora_kernels.reference`'s.

    Derivation (``x_l = x * m`` with m the scaled dropout mask or 1, ``u = x_l A^T``, ``v = dy B``)::

        y  = x W^T + b + s u B^T
        dx = dy W + s (dy B) A * m = dy W + s (v A) * m
        dA = s (dy B)^T x_l        = s v^T x_l
        dB = s dy^T (x_l A^T)      = s dy^T u
        dW = dy^T x,   db = sum_n dy      (only when they require grad)

    The rank-r products are formed first so every intermediate stays N x r.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_mask):
        xl = x if dropout_mask is None else x * dropout_mask
        u = xl @ lora_A.T.to(x.dtype)
        y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
        y = y + scaling * (u @ lora_B.T.to(x.dtype))
        ctx.save_for_backward(x, u, weight, lora_A, lora_B, dropout_mask)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, weight, lora_A, lora_B, mask = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = reference.lora_linear_backward(
            dy, x, weight, lora_A, lora_B, ctx.scaling, dropout_mask=mask, u=u,
            need_x_grad=need[0], need_weight_grad=need[1], need_bias_grad=ctx.has_bias and need[2])
        return g.x, g.weight, g.bias, g.lora_A, g.lora_B, None, None
