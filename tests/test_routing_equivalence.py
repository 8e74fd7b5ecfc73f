"""Routing equals the stock model where it must, and the naive masked reference everywhere else."""
from __future__ import annotations

import pytest
import torch
from reference import reference_logits
from tiny import IMAGE_TOKEN, left_pad, pixels, prompt, tiny_llava

from dpvr import DPVRConfig, convert

ROUTED = [
    DPVRConfig(mode="lf", split_layer=2, fusion_layers=1),
    DPVRConfig(mode="lf", split_layer=2, fusion_layers=2, side_depth=2),
    DPVRConfig(mode="lf", split_layer=3, fusion_layers=0),  # LF-ideal
    DPVRConfig(mode="pc", split_layer=3),
    DPVRConfig(mode="kv", split_layer=3, side_depth=2),
    DPVRConfig(mode="vtw", split_layer=2),
    DPVRConfig(mode="fastv", fastv_layer=1, fastv_ratio=0.5),
]
IDS = lambda c: f"{c.mode}-s{c.split_layer}-K{c.fusion_layers}-D{c.side_depth}"  # noqa: E731


def assert_text_close(got, want, input_ids, atol, what):
    """Only text positions' logits are part of the contract."""
    text = input_ids != IMAGE_TOKEN
    diff = (got - want)[text].abs().max().item()
    assert diff <= atol, f"{what}: max |diff| at text positions = {diff:.3e} > {atol:.0e}"


def converted(cfg, seed=0, **kw):
    model = convert(tiny_llava(seed=seed, **kw), cfg)
    if model.side_branch is not None:  # a copied side branch equals the layer it came from: perturb it
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.side_branch.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


@torch.no_grad()
@pytest.mark.parametrize("mode", ["vanilla", "lf", "pc", "kv", "vtw", "fastv"])
def test_vanilla_and_text_only_prompts_equal_stock(mode):
    stock = tiny_llava()
    model = converted(DPVRConfig(mode=mode, split_layer=2, fastv_layer=1))
    ids = torch.tensor([prompt(12, 0, n_images=0)])
    assert_text_close(model(input_ids=ids).logits, stock(input_ids=ids).logits, ids, 1e-5, f"{mode} text-only")
    if mode == "vanilla":
        ids, px = torch.tensor([prompt(3, 6)]), pixels(1)
        got, want = model(input_ids=ids, pixel_values=px).logits, stock(input_ids=ids, pixel_values=px).logits
        diff = (got - want).abs().max().item()
        assert diff <= 1e-5, f"vanilla vs stock with an image: max |diff| = {diff:.3e}"


@torch.no_grad()
@pytest.mark.parametrize("cfg", ROUTED, ids=IDS)
def test_routed_modes_equal_naive_masked_reference(cfg):
    model = converted(cfg)
    ids, px = torch.tensor([prompt(3, 7, n_images=2)]), pixels(2)
    got = model(input_ids=ids, pixel_values=px).logits
    want = reference_logits(model, model.side_branch, cfg, ids, px)
    assert_text_close(got, want, ids, 1e-4, f"{IDS(cfg)} vs reference")
    # and routing actually changed something (not silently vanilla)
    stock = tiny_llava()(input_ids=ids, pixel_values=px).logits
    text = ids != IMAGE_TOKEN
    assert (got - stock)[text].abs().max() > 1e-3, f"{IDS(cfg)} gave the stock logits"


@torch.no_grad()
@pytest.mark.parametrize("cfg", ROUTED, ids=IDS)
def test_left_padded_batch_equals_one_by_one(cfg):
    model = converted(cfg)
    rows = [prompt(2, 9, n_images=1, seed=1), prompt(5, 3, n_images=2, seed=2), prompt(7, 1, n_images=0, seed=3)]
    n_imgs = [1, 2, 0]
    ids, mask = left_pad(rows)
    px = pixels(3, seed=4)
    batched = model(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    want_ref = reference_logits(model, model.side_branch, cfg, ids, px, mask)
    start = 0
    for b, (row, n) in enumerate(zip(rows, n_imgs)):
        single_ids = torch.tensor([row])
        single = model(input_ids=single_ids, pixel_values=px[start : start + n] if n else None).logits
        start += n
        T = len(row)
        assert_text_close(batched[b : b + 1, -T:], single, single_ids, 1e-4, f"{IDS(cfg)} row {b} batched vs single")
        assert_text_close(batched[b : b + 1, -T:], want_ref[b : b + 1, -T:], single_ids, 1e-4, f"{IDS(cfg)} row {b}")


@torch.no_grad()
@pytest.mark.parametrize("cfg", [c for c in ROUTED if c.mode != "fastv"], ids=IDS)
def test_eager_equals_sdpa(cfg):
    ids, px = left_pad([prompt(3, 6, seed=5), prompt(1, 2, seed=6)])[0], pixels(2)
    mask = left_pad([prompt(3, 6, seed=5), prompt(1, 2, seed=6)])[1]
    eager = converted(cfg, attn="eager")(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    sdpa = converted(cfg, attn="sdpa")(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    assert_text_close(sdpa, eager, ids.masked_fill(mask == 0, IMAGE_TOKEN), 1e-5, f"{IDS(cfg)} sdpa vs eager")


@torch.no_grad()
def test_fastv_sdpa_keeps_the_same_tokens_as_eager():
    cfg = DPVRConfig(mode="fastv", fastv_layer=1, fastv_ratio=0.5)
    ids, px = torch.tensor([prompt(3, 6)]), pixels(1)
    eager = converted(cfg, attn="eager")(input_ids=ids, pixel_values=px).logits
    sdpa = converted(cfg, attn="sdpa")(input_ids=ids, pixel_values=px).logits
    assert_text_close(sdpa, eager, ids, 1e-5, "fastv sdpa vs eager")


@torch.no_grad()
@pytest.mark.parametrize("backbone", ["mistral", "qwen2", "qwen3"])  # qwen3: q/k norms
@pytest.mark.parametrize("mode", ["lf", "kv", "pc", "fastv"])
def test_other_text_backbones(backbone, mode):
    cfg = DPVRConfig(mode=mode, split_layer=2, fusion_layers=1, fastv_layer=1)
    model = converted(cfg, backbone=backbone)
    assert type(model.model.language_model).__name__.lower().startswith(backbone)
    ids, px = torch.tensor([prompt(3, 5, n_images=2)]), pixels(2)
    got = model(input_ids=ids, pixel_values=px).logits
    want = reference_logits(model, model.side_branch, cfg, ids, px)
    assert_text_close(got, want, ids, 1e-4, f"{backbone} {mode} vs reference")


@torch.no_grad()
def test_pc_and_kv_agree_at_text_positions():
    """Same side branch, same base: KV's keys/values-only image states are PC's reset states."""
    pc = converted(DPVRConfig(mode="pc", split_layer=3))
    kv = convert(tiny_llava(), DPVRConfig(mode="kv", split_layer=3))
    kv.side_branch.load_state_dict(pc.side_branch.state_dict())
    ids, px = torch.tensor([prompt(3, 5)]), pixels(1)
    a, b = pc(input_ids=ids, pixel_values=px).logits, kv(input_ids=ids, pixel_values=px).logits
    assert_text_close(a, b, ids, 1e-5, "pc vs kv")


@pytest.mark.parametrize("K", [1, 2])
def test_lf_skips_image_queries_in_text_only_and_last_layers(K):
    """No query is spent on image positions in LF's text-only layers, nor in its last layer, whose image
    outputs nothing reads (the reference above runs that layer in full: same text logits)."""
    cfg = DPVRConfig(mode="lf", split_layer=2, fusion_layers=K)
    model = converted(cfg)
    ids, px = torch.tensor([prompt(3, 5)]), pixels(1)
    rows = {}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, i, o, k=k: rows.__setitem__(k, o.shape[1]))
        for k, layer in enumerate(model.model.language_model.layers)
    ]
    with torch.no_grad():
        model(input_ids=ids, pixel_values=px)
    for h in hooks:
        h.remove()
    T, n_text = ids.shape[1], int((ids != IMAGE_TOKEN).sum())
    want = {0: T, 1: T, 2: n_text, 3: n_text, 4: n_text if K == 1 else T, 5: n_text}
    assert rows == want, rows


@torch.no_grad()
def test_routing_context_switches_modes_on_the_same_weights():
    model = converted(DPVRConfig(mode="lf", split_layer=2, fusion_layers=1))
    ids, px = torch.tensor([prompt(3, 5)]), pixels(1)
    lf = model(input_ids=ids, pixel_values=px).logits
    with model.routing(mode="vanilla"):
        vanilla = model(input_ids=ids, pixel_values=px).logits
    with model.routing(mode="fastv", fastv_layer=1):
        fastv = model(input_ids=ids, pixel_values=px).logits
    assert_text_close(vanilla, tiny_llava()(input_ids=ids, pixel_values=px).logits, ids, 1e-5, "routing(vanilla)")
    cfg = DPVRConfig(mode="fastv", fastv_layer=1)
    assert_text_close(fastv, reference_logits(model, None, cfg, ids, px), ids, 1e-4, "routing(fastv)")
    assert_text_close(model(input_ids=ids, pixel_values=px).logits, lf, ids, 0.0, "after the context")
    with pytest.raises(Exception, match="side_depth=2 but the side branch has 1"):
        with model.routing(side_depth=2):
            pass


@torch.no_grad()
@pytest.mark.parametrize("mode", ["lf", "kv", "vtw"])
def test_shallow_fastv_composition_equals_reference(mode):
    """Beyond the paper: FastV pruning inside the shared layers, then DPVR routing."""
    cfg = DPVRConfig(mode=mode, split_layer=3, fusion_layers=1, shallow_fastv=True, fastv_layer=1, fastv_ratio=0.5)
    model = converted(cfg)
    ids, mask = left_pad([prompt(3, 5, n_images=2, seed=1), prompt(1, 2, seed=2)])
    px = pixels(3)
    got = model(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    want = reference_logits(model, model.side_branch, cfg, ids, px, mask)
    assert_text_close(got, want, ids.masked_fill(mask == 0, IMAGE_TOKEN), 1e-4, f"{mode}+shallow fastv")
    plain = convert(tiny_llava(), DPVRConfig(mode=mode, split_layer=3, fusion_layers=1))
    if plain.side_branch is not None:
        plain.side_branch.load_state_dict(model.side_branch.state_dict())
    other = plain(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    assert (got - other)[mask.bool() & (ids != IMAGE_TOKEN)].abs().max() > 1e-4, "pruning changed nothing"


@torch.no_grad()
@pytest.mark.parametrize("cfg", ROUTED[:6], ids=IDS)
def test_output_hidden_states_per_layer(cfg):
    """One state per layer (plus the embeddings), also inside runs of layers gathered as one block:
    the shared layers' equal the stock model's, and the last one gives the logits at text positions."""
    model = converted(cfg)
    ids, mask = left_pad([prompt(3, 5, n_images=1, seed=1), prompt(2, 4, n_images=2, seed=2)])
    px = pixels(3)
    out = model(input_ids=ids, pixel_values=px, attention_mask=mask, output_hidden_states=True)
    L = len(model.model.language_model.layers)
    assert len(out.hidden_states) == L + 1, len(out.hidden_states)
    with model.routing(mode="vanilla"):
        stock = model(input_ids=ids, pixel_values=px, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    for i in range(cfg.split_layer + 1):
        diff = (out.hidden_states[i] - stock[i])[real].abs().max().item()
        assert diff <= 1e-5, f"{IDS(cfg)} shared hidden state {i}: max |diff| = {diff:.3e}"
    logits = model.lm_head(out.hidden_states[-1])  # after the final norm, as stock transformers returns it
    assert_text_close(logits, out.logits, ids.masked_fill(~real, IMAGE_TOKEN), 1e-5, f"{IDS(cfg)} last hidden state")


def _one_layer(T: int):
    """A tiny sdpa decoder layer and one row of T tokens: (layer, h, pos, valid, cos, sin)."""
    lm = tiny_llava(attn="sdpa").model.language_model
    h = torch.randn(1, T, lm.config.hidden_size)
    pos = torch.arange(T)[None]
    cos, sin = lm.rotary_emb(h, pos)
    return lm.layers[0], h, pos, torch.ones(1, T, dtype=torch.bool), cos, sin


@torch.inference_mode()
def test_routed_layer_equals_the_stock_layer_in_output_and_peak_memory():
    """Without a cache to fill, a routed layer frees its queries/keys/values before the MLP, as the stock
    layer does: holding them made every routed prefill peak above vanilla's (LF 1.25x on the CPU preset)."""
    from dpvr.bench.latency import peak_memory
    from dpvr.routing.layer import routed_layer

    layer, h, pos, valid, cos, sin = _one_layer(512)

    def stock():
        out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out

    routed = lambda: routed_layer(layer, h, pos, valid, cos, sin, dense=True, keep_keys=False)  # noqa: E731
    got, keys, _ = routed()
    diff = (got - stock()).abs().max().item()
    assert diff <= 1e-6, f"routed layer vs stock layer: max |diff| = {diff:.3e}"
    assert keys is None, "keep_keys=False must not return keys/values"
    peak_stock, peak_routed = peak_memory(stock, "cpu"), peak_memory(routed, "cpu")
    assert peak_routed <= peak_stock, f"routed layer peak {peak_routed} B > stock layer's {peak_stock} B"


@torch.inference_mode()
def test_fastv_probe_costs_one_row_of_attention_not_a_dense_mask():
    """FastV's ranking reads one query row's attention: its layer still runs mask-free and the probe
    adds O(N) memory. A dense (1, 1, N, N) bias at the probe layer made FastV's prefill peak 8.8x
    vanilla's at 12,544 image tokens."""
    from dpvr.bench.latency import peak_memory
    from dpvr.routing.layer import routed_layer

    T = 1024
    layer, h, pos, valid, cos, sin = _one_layer(T)
    plain = lambda: routed_layer(layer, h, pos, valid, cos, sin, dense=True)  # noqa: E731
    probed = lambda: routed_layer(layer, h, pos, valid, cos, sin, dense=True, probe_rows=torch.tensor([T - 1]))  # noqa: E731
    out, _, probs = probed()
    torch.testing.assert_close(out, plain()[0], rtol=0, atol=0)
    assert probs.shape == (1, layer.self_attn.config.num_attention_heads, T)
    dense_bias = T * T * h.element_size()
    extra = peak_memory(probed, "cpu") - peak_memory(plain, "cpu")
    assert extra < dense_bias / 8, f"the probe added {extra} B at {T} tokens (a dense bias is {dense_bias} B)"
