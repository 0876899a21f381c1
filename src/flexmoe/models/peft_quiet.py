"""PEFT calls without two PEFT 0.21 warnings that tell our users nothing they can act on."""

from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def peft_quietly():
    """Our own PEFT calls run without the FutureWarning of transformers' deprecated
    `is_gradient_checkpointing`, which PEFT calls, and "rank_pattern keys did not match": PEFT checks
    those keys against module names only, so it reports keys that match a targeted parameter (the
    experts' own rank) although it applies them (`models.lora._check_expert_rank` verifies that it did)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match.*", category=RuntimeWarning)
        yield
