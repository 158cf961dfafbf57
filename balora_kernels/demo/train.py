"""Fine-tuning a causal LM with LoRA or BaLoRA on a token stream: the demo's and the study's loop.

One run = a fresh copy of the base model, PEFT LoRA adapters on ``target_modules`` (same seed, so
the same initial ``A`` and ``B = 0`` for every method), AdamW at a constant learning rate, the same
batches in the same order, and the held-out loss on one fixed evaluation batch every
``eval_every`` steps. Method ``"lora"`` is plain PEFT; ``"svd"`` / ``"nearest"`` route the LoRA
layers through the package's op (:func:`balora_kernels.integrations.peft.to_balora`) and balance
every adapter after each optimizer step with that mode.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

METHODS = ("lora", "svd", "nearest")
METHOD_LABELS = {"lora": "LoRA", "svd": "BaLoRA (svd)", "nearest": "BaLoRA (nearest)"}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
class TokenData:
    """Fixed-length chunks of a token stream, split into train and held-out sets.

    ``tokens``: 1-D integer array. Chunk ``i`` (``seq_len`` tokens) is held out when
    ``i % heldout_every == heldout_every - 1``; the evaluation batch is ``eval_seqs`` held-out chunks
    spread evenly over the text. Training batches follow one seeded permutation of the train chunks.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, eval_seqs: int, seed: int = 0,
                 heldout_every: int = 20):
        n = len(tokens) // seq_len
        if n < 2 * heldout_every:
            raise ValueError(f"TokenData: {len(tokens)} tokens give only {n} chunks of {seq_len}")
        chunks = torch.from_numpy(np.asarray(tokens[: n * seq_len], dtype=np.int64)).view(n, seq_len)
        held = torch.arange(n) % heldout_every == heldout_every - 1
        heldout, self.train = chunks[held], chunks[~held]
        if eval_seqs > len(heldout):
            raise ValueError(f"TokenData: eval_seqs={eval_seqs} > {len(heldout)} held-out chunks")
        pick = torch.linspace(0, len(heldout) - 1, eval_seqs).round().long()
        self.eval = heldout[pick]
        self.seq_len, self.seed = seq_len, seed
        self._order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The ``step``-th training batch [batch_size, seq_len] (wraps around the permutation)."""
        n = len(self._order)
        idx = (torch.arange(batch_size) + step * batch_size) % n
        return self.train[self._order[idx]]


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    method: str = "nearest"
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    steps: int = 40
    batch_size: int = 4
    eval_every: int = 5
    target_modules: Sequence[str] = ("q_proj", "v_proj")
    seed: int = 0
    weight_decay: float = 0.0
    eval_batch_size: int = 8

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.steps < 1 or self.rank < 1 or self.eval_every < 1 or self.batch_size < 1:
            raise ValueError(f"steps, rank, eval_every and batch_size must be positive: {self}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"lr and alpha must be positive finite numbers: lr={self.lr}, alpha={self.alpha}")


@dataclass
class Curve:
    method: str
    config: dict
    steps: List[int] = field(default_factory=list)          # evaluation points (0 = before training)
    eval_loss: List[float] = field(default_factory=list)    # held-out loss at those points
    train_time_s: List[float] = field(default_factory=list) # training wall-clock up to each point
    train_loss: List[float] = field(default_factory=list)   # every step
    diverged_at: Optional[int] = None
    projection: Optional[dict] = None                       # last projection's stats (BaLoRA)

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def eval_loss(model, data: TokenData, device: torch.device, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over the fixed evaluation batch."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data.eval), batch_size):
        ids = data.eval[i:i + batch_size].to(device)
        with _autocast(device):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total / count


def add_adapters(base_model, cfg: RunConfig):
    """A PEFT model around a deep copy of ``base_model``; the adapters' init depends on ``cfg.seed`` only."""
    from peft import LoraConfig, get_peft_model
    model = copy.deepcopy(base_model)
    torch.manual_seed(cfg.seed)
    lc = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                    target_modules=list(cfg.target_modules), bias="none")
    return get_peft_model(model, lc)


def attach_balora(model, optimizer, mode: str):
    """Route PEFT's LoRA layers through the package's op and project after every step.

    Returns the projector. Uses :func:`balora_kernels.integrations.peft.to_balora`; a model it
    cannot patch still gets a :class:`~balora_kernels.BalancedProjector` over its adapters.
    """
    try:
        from ..integrations.peft import to_balora
    except ImportError:  # pragma: no cover - the integration ships with the package
        to_balora = None
    if to_balora is not None:
        patch = to_balora(model, mode=mode)
        return patch.projector.attach(optimizer)
    from ..projector import BalancedProjector
    return BalancedProjector(model, mode=mode).attach(optimizer)


def train_run(base_model, data: TokenData, cfg: RunConfig, device, progress: Optional[Callable] = None,
              on_eval: Optional[Callable[[Curve], None]] = None) -> Curve:
    """Train one method from ``base_model`` (left untouched) and return its :class:`Curve`.

    ``progress(n)`` is called after each step (a progress bar's ``update``); ``on_eval(curve)``
    after each evaluation.
    """
    device = torch.device(device)
    model = add_adapters(base_model, cfg).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    projector = attach_balora(model, opt, cfg.method) if cfg.method != "lora" else None
    curve = Curve(method=cfg.method, config=asdict(cfg))
    curve.config["target_modules"] = list(cfg.target_modules)

    def record(step: int, elapsed: float) -> None:
        curve.steps.append(step)
        curve.eval_loss.append(eval_loss(model, data, device, cfg.eval_batch_size))
        curve.train_time_s.append(elapsed)
        if on_eval:
            on_eval(curve)

    record(0, 0.0)
    elapsed = 0.0
    for step in range(1, cfg.steps + 1):
        ids = data.batch(step - 1, cfg.batch_size).to(device)
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        elapsed += time.perf_counter() - t0
        lv = float(loss.item())
        curve.train_loss.append(lv)
        if progress:
            progress(1)
        if not math.isfinite(lv):
            curve.diverged_at = step
            if progress:
                progress(cfg.steps - step)
            break
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record(step, elapsed)
    if projector is not None and projector.last_stats is not None:
        curve.projection = projector.last_stats.as_dict()
        projector.detach()
    return curve


def summarize(curves: Sequence[Curve]) -> Dict[str, dict]:
    """Per method: final and best held-out loss (NaN when it diverged)."""
    out = {}
    for c in curves:
        fin = c.eval_loss[-1] if c.diverged_at is None else float("nan")
        out[c.method] = {"final_eval_loss": fin, "best_eval_loss": float(np.nanmin(c.eval_loss)),
                         "initial_eval_loss": c.eval_loss[0], "diverged_at": c.diverged_at,
                         "train_time_s": c.train_time_s[-1]}
    return out
