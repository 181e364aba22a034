"""NOLA on stock PEFT: each LoRA factor is a linear combination of fixed random basis matrices.

Koohpayegani et al., "NOLA: Compressing LoRA using Linear Combination of Random Basis" (ICLR 2024):
A = Σ_i α_i A_i and B = Σ_j β_j B_j, where the bases A_i (r × in) and B_j (out × r) are drawn from a seed and
never stored; only the mixing coefficients α, β are trained. Here a PEFT LoRA model's `lora_A`/`lora_B` weights
become torch parametrizations of their coefficients, so PEFT's forward, merging and the elastic ranks of
`nlsflow.adapters.elastic` are unchanged. With `bits`, coefficients are quantized (uniform between their min and max,
2^bits levels) in the forward pass with a straight-through gradient, NOLA's quantized variant.

`save_nola` writes only coefficients, seed and shapes (`nola_config.json` + `nola_coefficients.safetensors`);
`load_nola` rebuilds the basis from the seed; `materialize` turns the factors into plain LoRA weights, after
which the model saves as a stock PEFT LoRA adapter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from nlsflow.artifacts import read_json, write_json
from nlsflow.errors import NlsflowError
from nlsflow.io import atomic_dir, folder_bytes
from schemas.files import NolaConfigFile

CONFIG_FILE, WEIGHTS_FILE = "nola_config.json", "nola_coefficients.safetensors"


@dataclass(frozen=True)
class NolaSpec:
    num_basis_a: int  # basis matrices for each A (r × in)
    num_basis_b: int  # basis matrices for each B (out × r)
    seed: int
    bits: int | None = None  # quantized coefficients: 2**bits levels; None keeps them in float


def basis_seed(seed: int, module: str, factor: str) -> int:
    """A per-(module, factor) seed that does not depend on Python's hash seed or on module order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{module}:{factor}".encode()).digest()[:8], "little") & (2**63 - 1)


def random_basis(count: int, shape: tuple[int, int], seed: int, fan_in: int) -> torch.Tensor:
    """`count` Gaussian matrices of `shape`, scaled like a Kaiming-normal init of a layer with `fan_in` inputs."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, *shape, generator=g) / fan_in**0.5


def level_grid(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest level, step) of 2**bits uniform levels spanning the values' [min, max]."""
    lo, hi = values.min().detach(), values.max().detach()
    return lo, (hi - lo).clamp_min(1e-12) / (2**bits - 1)


def quantize(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Each value to its nearest level; the gradient passes straight through (identity)."""
    lo, step = level_grid(values, bits)
    levels = lo + torch.round((values - lo) / step) * step
    return values + (levels - values).detach()


class BasisCombination(nn.Module):
    """Parametrization of a LoRA factor's weight: Σ_k coefficients[k] · basis[k] (the original weight is unused)."""

    def __init__(self, basis: torch.Tensor, coefficients: torch.Tensor, bits: int | None):
        super().__init__()
        self.register_buffer("basis", basis, persistent=False)  # regenerated from the seed, never saved
        self.coefficients = nn.Parameter(coefficients)
        self.bits = bits

    def mixing(self) -> torch.Tensor:
        return quantize(self.coefficients, self.bits) if self.bits else self.coefficients

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(self.mixing(), self.basis, dims=1)


def _factors(peft_model, adapter_name: str = "default"):
    """Yield (module name, factor "A"/"B", linear) for every LoRA factor of the adapter."""
    for name, layer in peft_model.named_modules():
        if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A:
            yield name, "A", layer.lora_A[adapter_name]
            yield name, "B", layer.lora_B[adapter_name]


def basis_floats(peft_model, spec: NolaSpec, adapter_name: str = "default") -> int:
    """How many numbers the bases of every factor hold (they live in memory for the whole run)."""
    return sum(
        (spec.num_basis_a if f == "A" else spec.num_basis_b) * l.weight.numel()
        for _, f, l in _factors(peft_model, adapter_name)
    )


def make_nola(peft_model, spec: NolaSpec, adapter_name: str = "default") -> int:
    """Reparametrize every LoRA factor in place; freeze the LoRA weights; return the number of coefficients.

    Init as in LoRA: A's coefficients random (A starts like a Kaiming init), B's zero (the delta starts at 0).
    """
    count = 0
    for name, factor, linear in _factors(peft_model, adapter_name):
        if parametrize.is_parametrized(linear, "weight"):
            raise NlsflowError(f"{name}.lora_{factor} is already parametrized: call make_nola once per model")
        out_f, in_f = linear.weight.shape  # A: (r, in), B: (out, r)
        k = spec.num_basis_a if factor == "A" else spec.num_basis_b
        basis = random_basis(k, (out_f, in_f), basis_seed(spec.seed, name, factor), fan_in=in_f)
        coefficients = (
            torch.randn(k, generator=torch.Generator().manual_seed(basis_seed(spec.seed, name, "init"))) / k**0.5
            if factor == "A"
            else torch.zeros(k)
        )
        dev, dtype = linear.weight.device, linear.weight.dtype
        linear.weight.requires_grad_(False)
        parametrize.register_parametrization(
            linear, "weight", BasisCombination(basis.to(dev, dtype), coefficients.to(dev, dtype), spec.bits)
        )
        count += k
    if not count:
        raise NlsflowError("NOLA found no LoRA layers: check train.target_modules")
    return count


def coefficient_state(peft_model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Every factor's coefficients (quantized: the levels the forward pass uses), keyed `<module>.lora_<A|B>`."""
    return {
        f"{name}.lora_{factor}": linear.parametrizations.weight[0].mixing().detach().float().cpu().contiguous()
        for name, factor, linear in _factors(peft_model, adapter_name)
    }


def save_nola(peft_model, spec: NolaSpec, out_dir: Path, adapter_name: str = "default") -> int:
    """Write coefficients, seed and shapes; return the bytes on disk. The basis is not saved."""
    state = coefficient_state(peft_model, adapter_name)
    shapes = {f"{n}.lora_{f}": list(l.weight.shape) for n, f, l in _factors(peft_model, adapter_name)}
    lora = peft_model.peft_config[adapter_name]
    doc = NolaConfigFile(
        nola=asdict(spec), shapes=shapes, lora_config=json.loads(json.dumps(lora.to_dict(), default=sorted))
    )
    with atomic_dir(Path(out_dir)) as tmp:
        write_json(tmp / CONFIG_FILE, doc, sort_keys=True)
        if spec.bits:  # store level indices (one byte each) and each tensor's range, not floats
            codes = {}
            for key, c in state.items():
                lo, step = level_grid(c, spec.bits)
                codes[f"{key}.codes"] = torch.round((c - lo) / step).to(torch.uint8)
                codes[f"{key}.grid"] = torch.stack([lo, step])
            state = codes
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "nola"})
    return folder_bytes(out_dir)


def read_nola(folder: Path) -> tuple[NolaSpec, NolaConfigFile, dict[str, torch.Tensor]]:
    """(spec, config file, coefficients) of a saved NOLA adapter, quantized codes turned back into levels."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise NlsflowError(f"{folder} is not a NOLA adapter (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    doc = read_json(folder / CONFIG_FILE, NolaConfigFile, "train")
    spec = NolaSpec(**doc.nola.model_dump())
    stored = load_file(str(folder / WEIGHTS_FILE))
    if not spec.bits:
        return spec, doc, stored
    coefficients = {}
    for key in doc.shapes:
        lo, step = stored[f"{key}.grid"]
        coefficients[key] = lo + stored[f"{key}.codes"].float() * step
    return spec, doc, coefficients


def is_nola(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def nola_lora_config(folder: Path) -> LoraConfig:
    """The LoRA config (rank, alpha, targets) the NOLA adapter's factors have."""
    _, doc, _ = read_nola(folder)
    return LoraConfig.from_peft_type(**doc.lora_config)


def load_nola(peft_model, folder: Path, adapter_name: str = "default") -> NolaSpec:
    """Reparametrize a fresh PEFT LoRA model of the same config and load the saved coefficients into it."""
    spec, doc, coefficients = read_nola(folder)
    shapes = {f"{n}.lora_{f}": list(l.weight.shape) for n, f, l in _factors(peft_model, adapter_name)}
    if shapes != doc.shapes:  # checked before anything changes: a mismatch leaves the model as it was
        key = next(k for k in sorted(shapes.keys() | doc.shapes.keys()) if shapes.get(k) != doc.shapes.get(k))
        raise NlsflowError(
            f"NOLA adapter {folder} does not fit this model at {key}: was it trained on this base "
            "with the same target_modules and rank?"
        )
    make_nola(peft_model, spec, adapter_name)
    for name, factor, linear in _factors(peft_model, adapter_name):
        linear.parametrizations.weight[0].coefficients.data.copy_(coefficients[f"{name}.lora_{factor}"])
    return spec


def materialize(peft_model, adapter_name: str = "default") -> None:
    """Replace each factor's parametrization by its current value: a plain LoRA weight (frozen, as make_nola left it)"""
    for _, _, linear in _factors(peft_model, adapter_name):
        if parametrize.is_parametrized(linear, "weight"):
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
