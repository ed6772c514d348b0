"""Activation streams: the inputs of the first block of a part (ViT embeddings, LLM layer-0 inputs), captured
once on the device and then pushed block by block through :func:`quantize.engine.quantize_stack`."""
from __future__ import annotations

import torch

__all__ = ["Stream", "StopForward", "to_device", "vision_stream", "llm_streams"]


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the wanted inputs are recorded."""


def to_device(obj, device):
    """``obj`` (tensors nested in tuples / lists / dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class Stream(list):
    """A list of ``(hidden [b, S, C], kwargs | None)`` batches."""


def vision_stream(vision_model, pixel_batches, device, batch_tiles: int = 8) -> Stream:
    """Embeddings of every tile, in batches of ``batch_tiles`` → :class:`Stream` (on ``device``)."""
    emb = vision_model.embeddings
    home = next(emb.parameters()).device
    emb.to(device)
    dtype = emb.patch_embedding.weight.dtype
    out = Stream()
    tiles = torch.cat(list(pixel_batches)) if pixel_batches else None
    if tiles is not None:
        with torch.no_grad():
            for chunk in torch.split(tiles, batch_tiles):
                out.append((emb(chunk.to(device, dtype)), None))
    emb.to(home)
    return out


def llm_streams(causal_lm, batches, device) -> Stream:
    """Inputs of decoder layer 0 (hidden + call kwargs) for each batch.

    ``batches``: list of ``{"input_ids": [b, S]}`` or ``{"inputs_embeds": [b, S, H]}``. Runs the model's own
    embedding / mask / rotary code (moved to ``device`` for the occasion) and stops at layer 0.
    """
    base = causal_lm.model
    layer0 = base.layers[0]
    captured = Stream()

    def hook(mod, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        kw["use_cache"] = False
        captured.append((x.detach(), kw))
        raise StopForward

    movable = [m for n, m in base.named_children() if n not in ("layers",)]
    homes = [next(m.parameters(), torch.empty(0)).device for m in movable]
    for m in movable:
        m.to(device)
    h = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    base(**to_device(b, device), use_cache=False)
                except StopForward:
                    pass
    finally:
        h.remove()
        for m, d in zip(movable, homes):
            m.to(d if d.type != "meta" else "cpu")
    return captured
