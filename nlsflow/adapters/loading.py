"""Attach a saved PEFT adapter to a base model: an adapter of another model's sizes fails with one line."""

from __future__ import annotations

import re
from pathlib import Path

from peft import PeftModel
from torch import nn

from nlsflow.errors import NlsflowError

# torch's load_state_dict: "size mismatch for <name>: copying a param with shape torch.Size([8, 32]) from
# checkpoint, the shape in current model is torch.Size([8, 64])."
SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


def load_peft_adapter(base: nn.Module, adapter_dir: Path | str, base_name: Path | str) -> PeftModel:
    """`PeftModel.from_pretrained(base, adapter_dir)`; an adapter of other tensor sizes fails with one line naming
    the first tensor that does not fit (`base_name`: the base's folder or id)."""
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except RuntimeError as error:
        if (match := SIZE_MISMATCH.search(str(error))) is None:
            raise
        name, saved, expected = match.groups()
        raise NlsflowError(
            f"the adapter in {adapter_dir} does not fit the base model {base_name} ({name} is {saved} in the "
            f"adapter, {expected} in the model): it was trained on another model; re-run train for this model"
        ) from None
