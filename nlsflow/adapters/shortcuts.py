"""HeteroLoRA's shortcut modules for Llama-family models: a low-rank connection across a decoder layer.

Layer i's output becomes `layer_i(h) + (alpha / r) * B(A(h))`, where h is the layer's input: a signal that skips
the layer's attention and MLP. B starts at zero, so a new shortcut changes nothing until it trains. Shortcuts live
in forward hooks, outside the PEFT and transformers module trees: the base model and its LoRA adapter stay stock,
and `save_pretrained`/`merge_and_unload` never see them. They cannot be merged into a weight (the layer between
their ends is not linear), so an adapter or merged folder carries them as `shortcuts.safetensors` +
`shortcuts.json`, and `load_shortcuts` attaches them again.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from weakref import WeakKeyDictionary

import torch
from safetensors.torch import load_file, save
from torch import nn

from nlsflow.errors import NlsflowError
from nlsflow.io import atomic_write_bytes, atomic_write_text

CONFIG_FILE, WEIGHTS_FILE = "shortcuts.json", "shortcuts.safetensors"


class Shortcut(nn.Module):
    def __init__(self, hidden_size: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Linear(hidden_size, rank, bias=False)
        self.B = nn.Linear(rank, hidden_size, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))  # as PEFT's LoRA A
        nn.init.zeros_(self.B.weight)
        self.scaling = alpha / rank
        self.enabled = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(hidden)) * self.scaling


class Shortcuts(nn.ModuleDict):
    """Shortcut modules keyed by decoder-layer index (as a string), and the hooks that apply them."""

    def __init__(self, rank: int, alpha: float):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.handles: list = []

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for attached in _ATTACHED.values():
            if self in attached:
                attached.remove(self)


def _layer_lists(model) -> list[nn.ModuleList]:
    return [m for n, m in model.named_modules() if n.endswith("layers") and isinstance(m, nn.ModuleList)]


def decoder_layers(model) -> nn.ModuleList:
    """The model's decoder layers: the one ModuleList named `layers` (Llama, Mistral, Qwen, per_layer_llama)."""
    found = _layer_lists(model)
    if len(found) != 1:
        raise NlsflowError(
            f"shortcuts need one decoder-layer list named 'layers'; {type(model).__name__} has {len(found)}; "
            "set method.selection.shortcuts=false for this model"
        )
    return found[0]


_ATTACHED: WeakKeyDictionary = WeakKeyDictionary()  # decoder-layer list -> the Shortcuts hooked on it


def _apply(shortcut: Shortcut):
    def hook(module, args, kwargs, output):
        if not shortcut.enabled:
            return output
        hidden = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output  # older transformers return (hidden_states, ...)
        out = out + shortcut(hidden.to(shortcut.A.weight.dtype)).to(out.dtype)  # float32 factors, as PEFT's LoRA
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


def attach_shortcuts(model, layers: list[int], rank: int, alpha: float) -> Shortcuts:
    """Add a float32 shortcut across each listed decoder layer, on the model's device."""
    blocks = decoder_layers(model)
    if bad := [i for i in layers if not 0 <= i < len(blocks)]:
        raise NlsflowError(
            f"shortcut layers {bad} are outside this model's {len(blocks)} decoder layers; "
            "use the base model the shortcuts were trained on"
        )
    device, hidden = next(model.parameters()).device, model.config.hidden_size
    shortcuts = Shortcuts(rank, alpha)
    for i in layers:
        shortcuts[str(i)] = Shortcut(hidden, rank, alpha).to(device)
        shortcuts.handles.append(blocks[i].register_forward_hook(_apply(shortcuts[str(i)]), with_kwargs=True))
    _ATTACHED.setdefault(blocks, []).append(shortcuts)
    return shortcuts


def attached_shortcuts(model) -> list[Shortcuts]:
    """Every group of shortcuts hooked on `model`'s decoder layers (none: an empty list)."""
    return [group for blocks in _layer_lists(model) for group in _ATTACHED.get(blocks, [])]


@contextmanager
def shortcuts_off(model):
    """Switch off every shortcut attached to `model` for the block (e.g. to score the base alone)."""
    shortcuts = [s for group in attached_shortcuts(model) for s in group.values()]
    before = [s.enabled for s in shortcuts]
    for s in shortcuts:
        s.enabled = False
    try:
        yield
    finally:
        for s, on in zip(shortcuts, before):
            s.enabled = on


def save_shortcuts(shortcuts: Shortcuts, out_dir: Path, layers: list[int] | None = None) -> None:
    """Write the listed layers' shortcuts (default: all) into `out_dir`."""
    keep = [str(i) for i in (layers if layers is not None else map(int, shortcuts.keys()))]
    state = {
        f"{i}.{factor}": getattr(shortcuts[i], factor).weight.detach().contiguous().cpu()
        for i in keep
        for factor in "AB"
    }
    atomic_write_bytes(
        Path(out_dir) / WEIGHTS_FILE, save(state, metadata={"format": "pt"})
    )  # bytes: written atomically
    atomic_write_text(
        Path(out_dir) / CONFIG_FILE,
        json.dumps({"rank": shortcuts.rank, "alpha": shortcuts.alpha, "layers": sorted(map(int, keep))}, indent=2),
    )


def has_shortcuts(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def load_shortcuts(model, folder: Path) -> Shortcuts | None:
    """Attach the shortcuts saved in `folder` to `model` (None when the folder has none)."""
    folder = Path(folder)
    if not has_shortcuts(folder):
        return None
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        rank, alpha, layers = int(config["rank"]), float(config["alpha"]), [int(i) for i in config["layers"]]
        state = load_file(folder / WEIGHTS_FILE)
    except Exception as e:  # missing, corrupt or incomplete files
        raise NlsflowError(
            f"the shortcuts in {folder} cannot be read ({type(e).__name__}: {e}); re-run the stage that wrote them"
        ) from None
    shortcuts = attach_shortcuts(model, layers, rank, alpha)
    try:
        shortcuts.load_state_dict({f"{i}.{f}.weight": state[f"{i}.{f}"] for i in map(str, layers) for f in "AB"})
    except (KeyError, RuntimeError) as e:
        shortcuts.detach()
        raise NlsflowError(
            f"{folder / WEIGHTS_FILE} does not fit this model ({str(e).splitlines()[0]}); "
            "use the base model the adapter was trained on"
        ) from None
    return shortcuts


def copy_shortcuts(src: Path, dst: Path) -> None:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        atomic_write_bytes(Path(dst) / name, (Path(src) / name).read_bytes())
