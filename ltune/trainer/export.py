"""The end of a run: a Hugging Face model folder (safetensors) in RUN_DIR/hf_model.

Under ZeRO-3 the weights are gathered from the partitions layer by layer onto rank 0
(DeepSpeed's ``_zero3_consolidated_16bit_state_dict``, the routine behind its
``save_16bit_model``); the folder is written under a temporary name and renamed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from .model import unwrap_state_dict


def export_hf_model(engine, plan, run_dir: Path, tokenizer=None) -> Path | None:
    """All ranks call this; rank 0 writes and returns the folder."""
    if plan.layout.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict() if dist.get_rank() == 0 else None
    out = Path(run_dir) / "hf_model"
    if dist.get_rank() == 0:
        lm = engine.module.lm
        tmp = out.with_name("hf_model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        lm.config.use_cache = True  # for inference; training set it off
        if lm.config.pad_token_id is None and tokenizer is not None and tokenizer.pad_token_id is not None:
            lm.config.pad_token_id = tokenizer.pad_token_id
        lm.save_pretrained(str(tmp), state_dict=unwrap_state_dict(state_dict), safe_serialization=True)
        lm.config.use_cache = False
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    dist.barrier()
    return out if dist.get_rank() == 0 else None
