"""`dpvr.analysis` against naive computations on tiny random LLaVAs (no downloads).

The naive side shares no code with the probe: it runs the stock decoder layers one by one over the full
sequence with explicit 4D masks, reads attention maps from eager `output_attentions=True`, and takes the
final distribution from the stock model's logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tiny import IMAGE_TOKEN, PAD, pixels, prompt, tiny_llava

from dpvr.analysis import ProbeState, masking_variants, measure_batch, probing, score_variants

IGNORE = -100


def make_batch(seed: int = 0) -> dict:
    """Two right-padded samples of different lengths; text before and after the image; answers labelled."""
    rows = [prompt(3, 7, seed=seed), prompt(2, 10, seed=seed + 1)]
    T = max(len(r) for r in rows)
    ids = torch.full((2, T), PAD, dtype=torch.long)
    am, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE)
    for b, r in enumerate(rows):
        n = len(r)
        ids[b, :n], am[b, :n] = torch.tensor(r), 1
        labels[b, n - 3 : n] = ids[b, n - 3 : n]  # the last 3 tokens are "the answer"
    return {"input_ids": ids, "attention_mask": am, "labels": labels, "pixel_values": pixels(2, seed=seed)}


def token_types(batch):
    valid = batch["attention_mask"].bool()
    image = (batch["input_ids"] == IMAGE_TOKEN) & valid
    return valid, image, valid & ~image


def naive_layers(model, batch, blocked_layers=()):
    """[merged input embeddings, output of layer 0, ..., output of layer L-1], each (B, T, D): full
    sequence, explicit additive masks; text queries lose image keys at `blocked_layers`."""
    lm = model.model.language_model
    ids, am = batch["input_ids"], batch["attention_mask"]
    valid, image, text = token_types(batch)
    B, T = ids.shape
    h = lm.embed_tokens(ids)
    feats = torch.cat(list(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
    h = h.masked_scatter(image[..., None], feats)
    pos = torch.arange(T)[None].expand(B, T)
    cos_sin = lm.rotary_emb(h, pos)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & valid[:, None, :]  # (B, T, T)
    blocked = allowed & ~(text[:, :, None] & image[:, None, :])
    outs = [h]
    for i, layer in enumerate(lm.layers):
        a = blocked if i in blocked_layers else allowed
        bias = torch.zeros(B, 1, T, T).masked_fill(~a[:, None], torch.finfo(h.dtype).min)
        h = layer(h, attention_mask=bias, position_ids=pos, position_embeddings=cos_sin)
        outs.append(h)
    return outs


@torch.no_grad()
def test_three_views_match_naive_computation():
    torch.manual_seed(0)
    sdpa, eager = tiny_llava(attn="sdpa"), tiny_llava(attn="eager")  # same seed: same weights
    batch = make_batch()
    stats, embeds = measure_batch(sdpa, batch)
    assert embeds.shape == (2, batch["input_ids"].shape[1], 48)
    valid, image, text = token_types(batch)
    L = len(eager.model.language_model.layers)

    stock = eager(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
                  output_attentions=True)  # fmt: skip
    hs = naive_layers(eager, batch)
    inputs, outs = hs[:-1], hs[1:]
    lm = eager.model.language_model
    final = eager.lm_head(lm.norm(outs[-1]))
    diff = (final - stock.logits)[valid].abs().max().item()
    assert diff < 1e-4, f"naive layer loop disagrees with the stock model: max |diff| {diff:.2e}"

    want_cos_img, want_cos_txt = torch.zeros(2, L), torch.zeros(2, L)
    want_kl_img, want_kl_txt = torch.zeros(2, L), torch.zeros(2, L)
    want_mass = torch.zeros(2, L, 4)
    log_final = F.log_softmax(stock.logits, -1)
    for b in range(2):
        after = [t for t in range(valid.shape[1]) if text[b, t] and image[b, :t].any()]  # text that can see the image
        img_keys = image[b].nonzero().flatten()
        for i in range(L):
            cos = F.cosine_similarity(inputs[i][b], outs[i][b], dim=-1)
            want_cos_img[b, i], want_cos_txt[b, i] = cos[image[b]].mean(), cos[text[b]].mean()
            log_lens = F.log_softmax(eager.lm_head(lm.norm(outs[i][b])), -1)
            kl = (log_final[b].exp() * (log_final[b] - log_lens)).sum(-1)
            want_kl_img[b, i], want_kl_txt[b, i] = kl[image[b]].mean(), kl[text[b]].mean()
            attn = stock.attentions[i][b]  # (H, T, T)
            want_mass[b, i] = torch.stack([attn[:, q, img_keys].sum(-1) for q in after]).mean(0)

    for name, got, want in [("cos_image", stats.cos_image, want_cos_img), ("cos_text", stats.cos_text, want_cos_txt),
                            ("kl_image", stats.kl_image, want_kl_img), ("kl_text", stats.kl_text, want_kl_txt),
                            ("mass", stats.mass, want_mass)]:  # fmt: skip
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert stats.mass.min() > 0.05, "the tiny model should attend to its image at all"
    assert torch.equal(stats.kl_image[:, -1], torch.zeros(2)) and torch.equal(stats.kl_text[:, -1], torch.zeros(2))
    assert sdpa.config.text_config._attn_implementation == "sdpa", "probing() must restore the attention setting"


@torch.no_grad()
def test_probe_output_equals_stock_sdpa():
    model = tiny_llava(attn="sdpa")
    batch = make_batch(seed=3)
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    want = model.model(**kw).last_hidden_state
    state = ProbeState.for_batch(batch["input_ids"], batch["attention_mask"], IMAGE_TOKEN, 6)
    with probing(model, state):
        got = model.model(**kw).last_hidden_state
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_text_that_cannot_see_the_image_has_zero_mass():
    model = tiny_llava(attn="sdpa")
    batch = make_batch(seed=1)
    L = 6
    state = ProbeState.for_batch(batch["input_ids"], batch["attention_mask"], IMAGE_TOKEN, L,
                                 blocked=torch.ones(2, L, dtype=torch.bool))  # fmt: skip
    with probing(model, state):
        model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    mass = state.mass_tensor()
    assert mass.shape == (L, 2, 4)
    assert torch.equal(mass, torch.zeros_like(mass)), f"max mass {mass.max().item():.3e} with text->image blocked"


@torch.no_grad()
def test_identity_layers_report_cosine_one_and_zero_kl():
    model = tiny_llava(attn="sdpa")
    for layer in model.model.language_model.layers:  # residual branches off: every layer is the identity
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    stats, _ = measure_batch(model, make_batch())
    for name in ("cos_image", "cos_text"):
        got = getattr(stats, name)
        torch.testing.assert_close(got, torch.ones_like(got), atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    for name in ("kl_image", "kl_text"):
        got = getattr(stats, name)
        assert got.abs().max() < 1e-6, f"{name}: max |KL| {got.abs().max().item():.2e} for identical layers"


def naive_scores(model, batch, blocked_layers):
    """(B,) answer log-likelihood and all-correct flag with text->image blocked at blocked_layers."""
    outs = naive_layers(model, batch, blocked_layers)
    logp = F.log_softmax(model.lm_head(model.model.language_model.norm(outs[-1])), -1)  # (B, T, V)
    ll, ok = [], []
    for b in range(logp.shape[0]):
        where = (batch["labels"][b, 1:] != IGNORE).nonzero().flatten()
        tok = batch["labels"][b, 1:][where]
        ll.append(logp[b, where].gather(-1, tok[:, None]).sum())
        ok.append(float(bool((logp[b, where].argmax(-1) == tok).all())))
    return torch.stack(ll), torch.tensor(ok)


@torch.no_grad()
def test_masking_matches_naive_reference():
    torch.manual_seed(0)
    model = tiny_llava(attn="sdpa")
    batch = make_batch(seed=2)
    L = 6
    blocked = masking_variants(L)
    assert blocked.shape == (1 + 2 * L, L) and not blocked[0].any()
    assert blocked[1 + 2].tolist() == [False, False, True, False, False, False]
    assert blocked[1 + L + 2].tolist() == [False, False, True, True, True, True]
    _, embeds = measure_batch(model, batch)
    ll, acc = score_variants(model, embeds, batch, blocked, max_rows=5)  # chunks that split a sample's variants
    assert ll.shape == acc.shape == (2, 1 + 2 * L)
    for v in range(blocked.shape[0]):
        want_ll, want_acc = naive_scores(model, batch, blocked[v].nonzero().flatten().tolist())
        torch.testing.assert_close(ll[:, v], want_ll, atol=1e-4, rtol=1e-5, msg=lambda m, v=v: f"variant {v}: {m}")
        assert torch.equal(acc[:, v], want_acc), f"variant {v}: accuracy {acc[:, v]} != naive {want_acc}"
    effect = (ll[:, 1:] - ll[:, :1]).abs().max().item()
    assert effect > 1e-2, f"blocking changed the answer log-likelihood by only {effect:.2e}: the test would be vacuous"
    # variant 0 is the stock model
    logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    logp = F.log_softmax(logits, -1)
    for b in range(2):
        where = (batch["labels"][b, 1:] != IGNORE).nonzero().flatten()
        want = logp[b, where].gather(-1, batch["labels"][b, 1:][where][:, None]).sum()
        assert abs(ll[b, 0].item() - want.item()) < 1e-4, f"sample {b}: baseline {ll[b, 0]:.6f} != stock {want:.6f}"
