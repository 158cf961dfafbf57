"""A lossless, compact copy of the demo model for machines without ``gguf`` or the model package.

The GGUF's quantized blocks are stored as they are (Q4_1 layers, Q8_0 embedding: 93 MiB instead
of 513 MiB of float32), split into parts small enough to travel separately, with an index that
maps each block run to its Hugging Face parameter name. :func:`load_packed_model` de-quantizes
them with torch exactly as ``gguf`` does (``d * q + m`` in float32), undoes llama.cpp's q/k row
permutation as transformers does, and returns the same float32 model as the demo's cache (the
packer checks this bit for bit before writing anything).

Block formats (32 weights along the input dimension, little-endian):
    Q4_1: fp16 d, fp16 m, 16 bytes of nibbles (weight j: low nibble of byte j, weight j+16: high)
    Q8_0: fp16 d, 32 int8
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

BLOCK = 32
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}

_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    """The Llama parameter name of a GGUF tensor name (the names SmolLM2's GGUF uses)."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    m = _LAYER.match(gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise KeyError(f"packed: no Llama name for GGUF tensor {gguf_name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"


def dequantize(raw: torch.Tensor, kind: str, shape: Sequence[int]) -> torch.Tensor:
    """float32 tensor of ``shape`` from raw bytes (uint8, any device) of ``kind`` Q4_1 / Q8_0 / F32."""
    if kind == "F32":
        return raw.view(torch.float32).reshape(shape).clone()
    nb = BLOCK_BYTES[kind]
    blocks = raw.reshape(-1, nb)
    d = blocks[:, :2].contiguous().view(torch.float16).float()            # [n, 1]
    if kind == "Q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8).float()            # [n, 32]
        return (q * d).reshape(shape)
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    qs = blocks[:, 4:]                                                     # [n, 16]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()                     # [n, 32]
    return ((d * q) + m).reshape(shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row order of a q/k weight (transformers' ``_reverse_permute_weights``)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def pack_gguf(gguf_path: Path, config: dict, out: Path, reference_state: Optional[Dict[str, torch.Tensor]] = None,
              parts: int = 2) -> List[Path]:
    """Write ``index.json``, ``config.json`` and ``weights_<i>.bin`` (``parts`` files of about equal
    size) to ``out``. With ``reference_state`` every de-quantized tensor is compared bit for bit
    first, and nothing is written on a mismatch."""
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(str(gguf_path))
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    entries, blobs = [], []
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in ("Q4_1", "Q8_0", "F32"):
            raise ValueError(f"packed: tensor {t.name} has type {kind}; only Q4_1, Q8_0 and F32 are supported")
        name = hf_name(t.name)
        shape = [int(s) for s in reversed(t.shape.tolist())]              # torch order [out, in]
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        heads = n_head if ".q_proj." in name else n_kv if ".k_proj." in name else None
        entries.append({"name": name, "kind": kind, "shape": shape, "permute_heads": heads, "nbytes": int(raw.size)})
        blobs.append(raw)
        if reference_state is not None:
            w = _entry_tensor(entries[-1], torch.from_numpy(raw.copy()))
            ref = reference_state[name]
            if w.shape != ref.shape or not torch.equal(w, ref.float()):
                raise ValueError(f"packed: {name} does not match the reference model "
                                 f"(max |diff| {(w - ref).abs().max().item() if w.shape == ref.shape else 'shape'})")
    total = sum(b.size for b in blobs)
    out.mkdir(parents=True, exist_ok=True)
    files, part, acc = [], 0, 0
    handles = [open(out / f"weights_{i}.bin", "wb") for i in range(parts)]
    try:
        offsets = [0] * parts
        for e, b in zip(entries, blobs):
            if acc >= (part + 1) * total / parts and part < parts - 1:
                part += 1
            e["part"], e["offset"] = part, offsets[part]
            handles[part].write(b.tobytes())
            offsets[part] += b.size
            acc += b.size
    finally:
        for h in handles:
            h.close()
    files = [out / f"weights_{i}.bin" for i in range(parts)]
    (out / "index.json").write_text(json.dumps({"format": 1, "source": gguf_path.name, "tensors": entries}))
    (out / "config.json").write_text(json.dumps(config))
    return files


def _entry_tensor(e: dict, raw: torch.Tensor) -> torch.Tensor:
    w = dequantize(raw, e["kind"], e["shape"])
    return unpermute_rows(w, e["permute_heads"]) if e["permute_heads"] else w


def load_packed_model(folder: Path, part_dirs: Sequence[Path] = (), device="cpu", dtype=torch.float32):
    """The float32 (then ``dtype``) Llama model from a packed folder; ``weights_<i>.bin`` are looked
    for in ``folder`` and then in each of ``part_dirs``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    folder = Path(folder)
    index = json.loads((folder / "index.json").read_text())
    cfg_dict = json.loads((folder / "config.json").read_text())
    cfg = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "model_type"},
                               model_type=cfg_dict["model_type"])
    parts = sorted({e["part"] for e in index["tensors"]})
    data = {}
    for p in parts:
        for d in [folder, *map(Path, part_dirs)]:
            f = d / f"weights_{p}.bin"
            if f.is_file():
                data[p] = torch.from_file(str(f), shared=False, size=f.stat().st_size, dtype=torch.uint8).to(device)
                break
        else:
            raise FileNotFoundError(f"packed: weights_{p}.bin not found in {[str(folder), *map(str, part_dirs)]}")
    state = {e["name"]: _entry_tensor(e, data[e["part"]][e["offset"]:e["offset"] + e["nbytes"]])
             for e in index["tensors"]}
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"packed: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    for p in model.parameters():          # parameters only: buffers (rotary frequencies) stay float32
        p.data = p.data.to(dtype)
    return model
