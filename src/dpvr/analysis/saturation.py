"""The paper's three per-layer views (section 3.1), measured on one batch of the stock model and
reduced to per-sample scalars at once:

1. adjacent-layer cosine similarity cos(h_in, h_out) of each decoder layer, mean over image / text positions;
2. text-to-image attention mass per head (see `probe.py`);
3. logit lens: KL(final || layer) of the next-token distribution, lens = final norm + lm_head applied to
   each layer's output, mean over image / text positions. The last layer's lens *is* the model's output,
   so its KL is exactly 0.

    stats, embeds = measure_batch(model, batch)     # batch from dpvr.data.collate.Collator(padding_side="right")
    stats.cos_image  # (B, L) ...; embeds (B, T, D): the merged input embeddings, reused by masking.py

Memory: one (B, T, D) output per layer is kept until the lens runs (the same as output_hidden_states);
the lens runs position-chunk by chunk, so at most (chunk, vocab) logits exist at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpvr.analysis.probe import ProbeState, probing
from dpvr.data.collate import IMAGE_KEYS, TOKEN_KEYS
from dpvr.errors import DPVRError
from dpvr.routing.backbones import backbone_of, prefill_positions


@dataclass
class BatchStats:
    cos_image: torch.Tensor  # (B, L) mean cos(h_in, h_out) over image positions
    cos_text: torch.Tensor  # (B, L) ... over text positions
    mass: torch.Tensor  # (B, L, H) text-to-image attention share per head (NaN: no text after the image)
    kl_image: torch.Tensor  # (B, L) mean KL(final || lens at layer) over image positions
    kl_text: torch.Tensor  # (B, L) ... over text positions
    # per sample (L, N_b): the chosen queries' mean attention on each image key, in image-token order
    # (only when measure_batch was given attend_from; not a per-layer scalar, so Accumulator.add skips it)
    image_attn: list[torch.Tensor] | None = None


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, T), mask (B, T) bool -> (B,) mean over the masked entries (NaN where none)."""
    count = mask.sum(-1)
    total = torch.where(mask, x, torch.zeros_like(x)).sum(-1)
    return (total / count.clamp(min=1)).masked_fill(count == 0, float("nan"))


def lens_log_probs(model, h: torch.Tensor) -> torch.Tensor:
    """(N, D) hidden -> (N, V) float32 log-probabilities through the final norm and lm_head."""
    return F.log_softmax(model.lm_head(model.model.language_model.norm(h)).float(), dim=-1)


def inputs_to_device(model, batch: dict) -> dict:
    device = model.lm_head.weight.device
    ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if (am[:, 0] == 0).any():
        raise DPVRError("the analysis needs right-padded batches (attention_mask[:, 0] must be 1)")
    images = {k: v.to(device, model.dtype if v.is_floating_point() else v.dtype)
              for k, v in batch.items() if k in (*IMAGE_KEYS, *TOKEN_KEYS)}  # fmt: skip
    # (B, T), equal to arange for right padding, or Qwen2-VL's multimodal rope (3, B, T), as the model's own
    pos, _ = prefill_positions(model, backbone_of(model), ids, am.bool(), None, images)
    return {"input_ids": ids, "attention_mask": am, "position_ids": pos, "pixel_values": None, **images}


@torch.no_grad()
def measure_batch(
    model, batch: dict, lens_chunk: int = 512, attend_from: torch.Tensor | None = None
) -> tuple[BatchStats, torch.Tensor]:
    """Three-view statistics of one right-padded batch, and its merged input embeddings (B, T, D).
    attend_from (B, T) bool: also keep each row's attention from those query positions over its image keys."""
    lm = model.model.language_model
    L = len(lm.layers)
    inputs = inputs_to_device(model, batch)
    state = ProbeState.for_batch(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id, L,
                                 attend_from=attend_from)  # fmt: skip
    image, text = state.image, state.text  # (B, T) bool each
    B = image.shape[0]
    cos_image = torch.full((B, L), float("nan"))
    cos_text = torch.full((B, L), float("nan"))
    outputs: list[torch.Tensor | None] = [None] * L  # per layer (B, T, D)
    captured: dict[str, torch.Tensor] = {}

    def hook(i: int):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
            h_out = output[0] if isinstance(output, tuple) else output  # (B, T, D)
            if i == 0:
                captured["embeds"] = h_in.detach()
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (B, T)
            cos_image[:, i] = masked_mean(cos, image).cpu()
            cos_text[:, i] = masked_mean(cos, text).cpu()
            outputs[i] = h_out.detach()

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    try:
        with probing(model, state):
            model.model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(o is None for o in outputs):
        raise DPVRError("some decoder layers did not run; the analysis needs a full forward of the stock model")
    mass = state.mass_tensor().permute(1, 0, 2).float().cpu()  # (B, L, H)

    # logit lens on every real position, chunked over positions
    b_idx, t_idx = (image | text).nonzero(as_tuple=True)  # (N,) each
    kl = torch.zeros(L, B, image.shape[1])  # (L, B, T)
    for chunk in torch.arange(len(b_idx)).split(lens_chunk):
        bb, tt = b_idx[chunk], t_idx[chunk]
        final = lens_log_probs(model, outputs[-1][bb, tt])  # (C, V)
        p_final = final.exp()
        for i in range(L):
            lp = final if i == L - 1 else lens_log_probs(model, outputs[i][bb, tt])
            kl[i, bb.cpu(), tt.cpu()] = (p_final * (final - lp)).sum(-1).cpu()
    image_c, text_c = image.cpu(), text.cpu()
    kl_image = torch.stack([masked_mean(kl[i], image_c) for i in range(L)], dim=1)  # (B, L)
    kl_text = torch.stack([masked_mean(kl[i], text_c) for i in range(L)], dim=1)
    stats = BatchStats(cos_image=cos_image, cos_text=cos_text, mass=mass, kl_image=kl_image, kl_text=kl_text)
    if attend_from is not None:
        att = torch.stack(state.attention, dim=1)  # (B, L, T)
        stats.image_attn = [att[b][:, image_c[b]] for b in range(B)]  # (L, N_b) each
    return stats, captured["embeds"]
