"""LoRA on the prefix LM, through peft, applied in one place (:func:`apply_lora`).

The base model's weights stay frozen (and out of checkpoints); only the low-rank adapters train. Target
modules default per model family; names that do not exist in the model are refused with the names that do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
}
"""LoRA targets per ``config.model_type``: the attention input projections, as in the LoRA paper."""

_ADAPTABLE = (nn.Linear, Conv1D, nn.Embedding)


@dataclass
class LoraSettings:
    """peft LoRA settings for the prefix LM.

    Args:
        rank: the adapters' rank r.
        alpha: the scaling numerator; updates are scaled by ``alpha / rank``.
        dropout: dropout on the adapters' input.
        target_modules: module names (the last part of the name, or a dotted suffix) to adapt; the model
            family's defaults (:data:`DEFAULT_TARGET_MODULES`) when None.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be ≥ 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


def adaptable_module_names(model: nn.Module) -> list[str]:
    """The distinct last name parts of the layers LoRA can adapt (linear, GPT-2 Conv1D, embeddings)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, _ADAPTABLE) and name
        }
    )


def resolve_target_modules(model: PreTrainedModel, settings: LoraSettings, source: str) -> list[str]:
    """The target module names for ``model``, checked to exist.

    Raises:
        ValueError: no targets given for a family without defaults, or a target that matches no
            adaptable layer; the message lists the layers that exist.
    """
    model_type = getattr(model.config, "model_type", None)
    available = adaptable_module_names(model)
    targets = settings.target_modules
    if targets is None:
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"PrefixLM(pretrained={source!r}): no default LoRA targets for model type {model_type!r}; "
                f"set lora.target_modules to some of its layers: {available}"
            )
        targets = DEFAULT_TARGET_MODULES[model_type]
    if not targets:
        raise ValueError(
            f"PrefixLM(pretrained={source!r}): lora.target_modules is empty; choose from {available}"
        )
    names = [name for name, module in model.named_modules() if isinstance(module, _ADAPTABLE)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"PrefixLM(pretrained={source!r}): LoRA target modules {missing} do not exist in this "
            f"{model_type} model; its adaptable layers are: {available}"
        )
    return list(targets)


def apply_lora(model: PreTrainedModel, settings: LoraSettings, source: str) -> PeftModel:
    """Wraps ``model`` with LoRA adapters: its own weights frozen, the adapters trainable (in float32
    even when the base is float16/bfloat16, so that optimizer updates are not lost to rounding).

    Args:
        model: the causal LM.
        settings: the LoRA settings.
        source: the model's pretrained name, for error messages.
    """
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=resolve_target_modules(model, settings, source),
        bias="none",
        task_type="CAUSAL_LM",
        # GPT-2's Conv1D stores its weight transposed (in, out); peft must know, or the update is wrong.
        fan_in_fan_out=getattr(model.config, "model_type", None) == "gpt2",
    )
    return get_peft_model(model, config, autocast_adapter_dtype=True)


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key of an adapted model belongs to a LoRA adapter (not the frozen base)."""
    return "lora_" in key
