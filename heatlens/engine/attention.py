"""Attention probabilities of a vision transformer, captured for one forward pass.

Fused attention (``scaled_dot_product_attention``, the default of timm, torch and Hugging Face)
never materialises the attention matrix, so hooks on it capture nothing. For the one call, each
attention module runs its eager path instead, which computes the same softmax explicitly, and the
matrix is recorded as a tensor of the forward graph (so its gradient can be taken); afterwards the
setting is restored:

* timm ``Attention``: ``fused_attn`` is set to ``False`` and the output of its ``attn_drop``
  (the probabilities, ``(B, heads, N, N)``) is recorded;
* ``torch.nn.MultiheadAttention`` (torchvision ViT): its output is recomputed from the module's
  own projections with the softmax written out (the same math, in the graph), and the
  probabilities are recorded; the caller gets what it asked for (``None`` weights when it passed
  ``need_weights=False``);
* Hugging Face attention modules: ``config._attn_implementation`` is set to ``"eager"`` and the
  probabilities the module returns are recorded.

Windowed attention (Swin) attends within windows, not over the image: rollout does not apply, and
a clear error says so.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from heatlens.engine.hooks import forward_hooks

_WINDOWED = ("WindowAttention", "ShiftedWindowAttention", "SwinSelfAttention")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's self-attention modules that :func:`attention_recorded` can read, in
    registration order; a ``ValueError`` for a model with none or with windowed attention."""
    found, windowed = [], []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in _WINDOWED:
            windowed.append(name)
        elif isinstance(module, nn.MultiheadAttention) or _is_timm(module) or _is_hf(module):
            found.append((name, module))
    if windowed:
        raise ValueError(
            f"this model ({type(model).__name__}) uses windowed attention ({windowed[0]!r}): "
            "each token attends within its window, so attention rollout has no image-wide "
            "attention to follow. Use a CAM method (gradcam, layercam, ...) instead"
        )
    if not found:
        raise ValueError(
            f"found no self-attention module in {type(model).__name__} (timm Attention, "
            "torch.nn.MultiheadAttention or a Hugging Face attention module); attention "
            "methods need a vision transformer. Use a CAM method for other models"
        )
    return found


def _is_timm(module: nn.Module) -> bool:
    return hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None),
                                                       nn.Module)


def _is_hf(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return (type(module).__name__.endswith("Attention") and config is not None
            and hasattr(config, "_attn_implementation")
            and any(isinstance(child, nn.Linear) for child in module.children()))


@contextmanager
def attention_recorded(model: nn.Module) -> Iterator[list[Tensor]]:
    """Inside the block, every forward pass of ``model`` on this thread appends each attention
    module's probabilities ``(B, heads, N, N)`` to the yielded list, in the order they run.
    Hooks and settings are undone afterwards, also when the pass raises."""
    recorded: list[Tensor] = []
    with ExitStack() as stack:
        for _, module in attention_modules(model):
            if isinstance(module, nn.MultiheadAttention):
                stack.enter_context(_multihead_recomputed(module, recorded))
            elif _is_timm(module):
                stack.enter_context(_timm_eager(module, recorded))
            else:
                stack.enter_context(_hf_eager(module, recorded))
        yield recorded


@contextmanager
def _timm_eager(module: nn.Module, recorded: list[Tensor]) -> Iterator[None]:
    def keep(_: nn.Module, args: Any, output: Tensor) -> None:
        recorded.append(output)

    with forward_hooks([(module.attn_drop, keep)]), switched(module, "fused_attn", False):
        yield


@contextmanager
def _multihead_recomputed(module: nn.MultiheadAttention, recorded: list[Tensor]
                          ) -> Iterator[None]:
    def recompute(_: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        attention, result = _multihead_eager(module, *args[:3], **kwargs)
        recorded.append(attention)
        asked = kwargs.get("need_weights", True)
        return result, (attention if kwargs.get("average_attn_weights") is False
                        else attention.mean(dim=1)) if asked else None

    with forward_hooks([(module, recompute)], with_kwargs=True):
        yield


def _multihead_eager(module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                     **kwargs: Any) -> tuple[Tensor, Tensor]:
    """``nn.MultiheadAttention``'s computation written out (inference, no masks), so that the
    probabilities ``(B, heads, L, S)`` are part of the graph that gives the output."""
    masked = [k for k in ("key_padding_mask", "attn_mask") if kwargs.get(k) is not None]
    if masked or kwargs.get("is_causal") or module.bias_k is not None or module.add_zero_attn:
        raise ValueError(
            "attention methods read nn.MultiheadAttention without masks, bias_k/bias_v or "
            f"add_zero_attn; this call uses {masked or 'one of them'}"
        )
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.chunk(3)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    biases = (module.in_proj_bias.chunk(3) if module.in_proj_bias is not None
              else (None, None, None))
    heads = module.num_heads

    def split(t: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        projected = F.linear(t, weight, bias)
        return projected.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = (split(t, w, b) for t, w, b in zip((query, key, value), weights, biases,
                                                 strict=True))
    attention = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
    mixed = (attention @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
    output = module.out_proj(mixed)
    return attention, output if module.batch_first else output.transpose(0, 1)


@contextmanager
def _hf_eager(module: nn.Module, recorded: list[Tensor]) -> Iterator[None]:
    def keep(_: nn.Module, args: Any, output: Any) -> None:
        recorded.append(output[1])

    with forward_hooks([(module, keep)]), switched(module.config, "_attn_implementation",
                                                     "eager"):
        yield


_SWITCH_LOCK = threading.Lock()
_SWITCHED: dict[tuple[int, str], list[Any]] = {}  # (id, attribute) -> [users, original]


@contextmanager
def switched(owner: Any, attribute: str, value: Any) -> Iterator[None]:
    """Set ``owner.attribute = value`` while at least one call (of any thread) is inside, and
    restore the original when the last one leaves: two threads that overlap cannot leave the
    eager setting behind. Threads that only run the model meanwhile get the same numbers
    through the eager path."""
    key = (id(owner), attribute)
    with _SWITCH_LOCK:
        if key in _SWITCHED:
            _SWITCHED[key][0] += 1
        else:
            _SWITCHED[key] = [1, getattr(owner, attribute)]
            setattr(owner, attribute, value)
    try:
        yield
    finally:
        with _SWITCH_LOCK:
            entry = _SWITCHED[key]
            entry[0] -= 1
            if entry[0] == 0:
                setattr(owner, attribute, entry[1])
                del _SWITCHED[key]
