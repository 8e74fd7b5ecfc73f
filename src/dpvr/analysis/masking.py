"""Layer-wise masking (after the related paper's analysis): block text-to-image attention at one layer
only, or from one layer to the last, and score the answer teacher-forced.

    blocked = masking_variants(L)                   # (V = 1 + 2L, L): none, only layer l, layers l..L-1
    ll, acc = score_variants(model, embeds, batch, blocked)   # (B, V) answer log-likelihood, all-tokens-correct

A large drop when layer l alone is blocked says fusion happens at l; a drop that reappears for late
layers says the model "reviews" the image before answering. Image-to-image attention is untouched:
only text queries lose the image keys. Every variant starts from the same merged input embeddings, so
the vision tower runs once per sample (in `saturation.measure_batch`), and the prefix up to the first
text token after the image (which blocking cannot change) runs once per sample into a KV cache.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from dpvr.analysis.probe import ProbeState, probing
from dpvr.analysis.saturation import inputs_to_device
from dpvr.data.llava_json import IGNORE
from dpvr.errors import DPVRError
from dpvr.hf_compat import STOCK_CACHE_KWARG, output_cache


def masking_variants(num_layers: int) -> torch.Tensor:
    """(1 + 2L, L) bool: row 0 blocks nothing, row 1 + l blocks layer l, row 1 + L + l blocks l..L-1."""
    L = num_layers
    layer = torch.arange(L)
    only = layer[:, None] == layer[None, :]  # (L, L)
    onward = layer[None, :] >= layer[:, None]  # (L, L): row l blocks columns j >= l
    return torch.cat([torch.zeros(1, L, dtype=torch.bool), only, onward])


@torch.no_grad()
def score_variants(
    model, embeds: torch.Tensor, batch: dict, blocked: torch.Tensor, max_rows: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer log-likelihood and teacher-forced accuracy of every (sample, variant): two (B, V) tensors.

    embeds (B, T, D) are the merged input embeddings of the right-padded `batch`; labels mark the
    answer tokens (and their end token) to score; accuracy is 1 when greedy argmax gets every one right.

    Blocking text-to-image attention cannot change anything before the first text token that follows
    an image (those positions never see an image key as a text query), so that prefix runs once per
    sample into a KV cache, and only the rest (question + answer) runs once per variant.
    """
    lm = model.model.language_model
    L = len(lm.layers)
    inputs = inputs_to_device(model, batch)
    state = ProbeState.for_batch(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id, L)
    labels = batch["labels"].to(embeds.device)  # (B, T)
    B, V = embeds.shape[0], blocked.shape[0]
    ll, acc = torch.empty(B, V), torch.empty(B, V)
    for b in range(B):
        n = int(inputs["attention_mask"][b].sum())
        if not bool(state.row_valid[b, 0]):
            raise DPVRError(f"batch row {b}: no text follows the image, nothing to mask")
        p = int(state.rows[b, 0])  # first text position after the image
        target = labels[b, 1:n]  # (n-1,): token t+1 is predicted at position t
        where = (target != IGNORE).nonzero().flatten()  # predicting positions
        if len(where) == 0 or int(where[0]) < p:
            raise DPVRError(f"batch row {b}: the answer must come after the image and the question")
        prefix = output_cache(lm(inputs_embeds=embeds[b : b + 1, :p], position_ids=inputs["position_ids"][..., b : b + 1, :p],
                                 use_cache=True))  # fmt: skip
        suffix = embeds[b : b + 1, p:n]  # (1, S, D)
        for rows in torch.arange(V).split(max_rows):
            C = len(rows)
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(C)
            probe = ProbeState(image=state.image[b : b + 1, :n].expand(C, n), text=state.text[b : b + 1, :n].expand(C, n),
                               num_layers=L, blocked=blocked[rows].to(embeds.device), measure_mass=False)  # fmt: skip
            with probing(model, probe):
                hidden = lm(inputs_embeds=suffix.expand(C, -1, -1), position_ids=inputs["position_ids"][..., b : b + 1, p:n],
                            **{STOCK_CACHE_KWARG: cache}, use_cache=True).last_hidden_state  # (C, S, D), final norm applied  # fmt: skip
            logp = F.log_softmax(model.lm_head(hidden[:, where - p]).float(), dim=-1)  # (C, A, vocab)
            tok = target[where]  # (A,)
            ll[b, rows] = logp.gather(-1, tok[None, :, None].expand(C, -1, 1)).squeeze(-1).sum(-1).cpu()
            acc[b, rows] = (logp.argmax(-1) == tok[None]).all(-1).float().cpu()
    return ll, acc
