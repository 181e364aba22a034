"""Run by tests/test_distributed.py under torchrun (2 processes, gloo): a PEFT LoRA model sharded by FSDP, as
accelerate shards it with PEFT's wrap policy, is unsharded for saving; the main process's saved adapter must equal
the weights before sharding. Prints `max diff <x>` on the main process."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.utils.other import fsdp_auto_wrap_policy
from safetensors.torch import load_file
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

from nlsflow.training import unshard_for_saving


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    main_process = dist.get_rank() == 0
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    wrapped = FullyShardedDataParallel(
        model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True, device_id=torch.device("cpu")
    )
    ids = torch.randint(0, 64, (2, 8))
    wrapped(input_ids=ids, labels=ids).loss.backward()  # the model is used sharded
    sharded = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator = types.SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        is_main_process=main_process,
        device=torch.device("cpu"),
        unwrap_model=lambda m: m.module,
    )
    unshard_for_saving(accelerator, wrapped)
    if main_process:
        model.save_pretrained(out)
        saved = load_file(out / "adapter_model.safetensors")
        assert saved.keys() == before.keys(), sorted(set(saved) ^ set(before))
        print(f"sharded {sharded} of {sum(v.numel() for v in before.values())} trained values on this process")
        print(f"max diff {max((saved[k] - before[k]).abs().max().item() for k in saved)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
