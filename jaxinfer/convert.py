"""Convert any checkpoint load_model reads into an orbax checkpoint with its config and tokenizer files."""

from __future__ import annotations

import tempfile
from pathlib import Path

from jaxinfer import progress as progress_lib
from jaxinfer.api import load_model
from jaxinfer.checkpoints.orbax_ckpt import check_destination, save_orbax


def convert(src: str | Path, dst: str | Path, *, dtype: str | None = None, progress=False, overwrite=False,
            quantize: str = "auto") -> Path:
    """Load src (default, .gguf, HF or orbax dir), write dst atomically: an interrupted convert leaves nothing.
    A dst that cannot be written is refused before src is read. quantize as for load_model: the weights are
    stored as they are held (a quantized one's parts, its layout named in the manifest)."""
    check_destination(dst, overwrite)
    reading = progress_lib.resolve(progress, f"reading {Path(str(src)).name}")
    model = load_model(src, dtype, progress=reading, layout="scanned", quantize=quantize)  # orbax stores it stacked
    extra_files = {}
    if model.tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            model.tokenizer.save(tmp)
            extra_files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return save_orbax(
        model.cfg, model.params, dst, extra_files=extra_files,
        progress=progress_lib.resolve(progress, f"writing {Path(dst).name}"), overwrite=overwrite,
    )
