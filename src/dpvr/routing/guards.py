"""One-line refusals of inputs and settings the routed forward cannot serve exactly; each would
otherwise be a crash far from its cause or a silent wrong answer."""
from __future__ import annotations

import torch

from dpvr.attention import CONTRAST_OF, SDPA_LIKE
from dpvr.config import DPVRConfig
from dpvr.errors import DPVRError

# what routing's explicit (B, 1, Nq, Nk) additive bias runs under; flex_attention wants a block mask
# (given the bias, it aborted the process) and flash attention takes no bias at all
ROUTED_ATTENTION = ("eager", *SDPA_LIKE, CONTRAST_OF["eager"])  # contrast: dpvr.contrast


def check_attention(text_config, cfg: DPVRConfig) -> None:
    """Refuse a routed mode under an attention implementation routing does not run on."""
    impl = getattr(text_config, "_attn_implementation", None) or "eager"
    if cfg.mode != "vanilla" and impl not in ROUTED_ATTENTION:
        raise DPVRError(f"attn_implementation={impl!r} cannot run mode {cfg.mode!r}: routed layers need one of "
                        f"{', '.join(ROUTED_ATTENTION)} (load the model with attn_implementation='sdpa')")  # fmt: skip


def side_branch_split(side) -> int | None:
    """The split a side branch was made for: its first layer's index (copied from, or built as, layer s)."""
    return None if side is None or len(side) == 0 else getattr(side[0].self_attn, "layer_idx", None)


def check_side_branch_fits(side, cfg: DPVRConfig) -> None:
    """A side branch made for split s runs at split s only, as from_pretrained(dpvr_config=) requires: it
    was copied from (and trained as) layer s, on the states layer s - 1 leaves."""
    made_for = side_branch_split(side)
    if cfg.has_side_branch and made_for is not None and made_for != cfg.split_layer:
        raise DPVRError(f"split_layer={cfg.split_layer} does not fit the side branch, made for split_layer={made_for}; "
                        f"keep split_layer={made_for}, or convert and train a side branch for the new split")  # fmt: skip


def refuse_image_at_end(input_ids: torch.Tensor, attention_mask, image_token_id: int) -> None:
    """The next-token logits of a prompt ending in an image token would be read where the deep layers
    never ran (routing runs them on text; FastV may drop the token): refuse instead."""
    last = input_ids[:, -1] == image_token_id
    if attention_mask is not None and attention_mask.dim() == 2:
        last &= attention_mask[:, -1].bool()
    if bool(last.any()):
        rows = last.nonzero().flatten().tolist()
        raise DPVRError(f"rows {rows} end with an image token: routing gives no next-token logits there (the deep "
                        "layers run on text); end the prompt with text, e.g. the chat template's generation prompt")  # fmt: skip


def check_side_branch_only_save(cfg: DPVRConfig) -> None:
    if cfg.freeze == "none":
        raise DPVRError("side_branch_only=True would save the side branch alone, but this model was converted with "
                        "freeze='none' (its base weights train too): save the whole model (side_branch_only=False)")  # fmt: skip
