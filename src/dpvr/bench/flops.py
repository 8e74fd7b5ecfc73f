"""Analytic forward FLOPs for every routing mode (the paper's Table 1), and `dpvr flops`.

    dpvr flops --arch llava-1.5-7b --split-layer 18            # table for text lengths 32..1024
    forward_flops(config, DPVRConfig(mode="lf", split_layer=18), n_img=576, n_txt=64)
    forward_flops(config, "lf", 18, 1, 1, n_img=576, n_txt=64)  # the same: a mode, then the paper's s, K, D

Convention: torch.utils.flop_counter's (2 x multiply-adds of matmuls, convolutions and attention;
norms, rotary and other elementwise work are not counted), and exactly what dpvr computes: dense
attention rectangles (a causal mask does not halve the count), DPVR-KV's image keys/values recomputed
from the side-branch states in every deep layer, FastV's one probed query row. tests/test_flops.py
checks these numbers against FlopCounterMode on real forwards.
"""
from __future__ import annotations

import argparse
import json

from dpvr.bench.vision_flops import default_image, image_tokens, linear, vision_flops
from dpvr.config import DPVRConfig, add_routing_arguments
from dpvr.config import MODES as ROUTING_MODES
from dpvr.routing.schedule import ALL, IMAGE, TEXT, Step, compile_schedule

DEFAULTS = DPVRConfig()
# the routing modes, and LF-ideal (lf with fusion_layers=0) as a row of its own
MODES = tuple(dict.fromkeys(("vanilla", "lf", "lf-ideal", *ROUTING_MODES)))


def decoder_layer(text, nq: int, nk: int, kv_tokens: int | None = None) -> int:
    """A Llama-style layer: nq query tokens attending over nk keys; k/v projected for kv_tokens (default nq)."""
    D, H = text.hidden_size, text.num_attention_heads
    hd = getattr(text, "head_dim", None) or D // H
    Hkv = getattr(text, "num_key_value_heads", None) or H
    kv_tokens = nq if kv_tokens is None else kv_tokens
    proj = linear(nq, D, H * hd) + linear(nq, H * hd, D) + 2 * linear(kv_tokens, D, Hkv * hd)
    attention = 4 * H * hd * nq * nk
    mlp = 3 * linear(nq, D, text.intermediate_size)
    return proj + attention + mlp


def kv_projection(text, tokens: int) -> int:
    """Keys and values of fixed states (DPVR-KV's image tokens) through one layer's k/v projections."""
    D, H = text.hidden_size, text.num_attention_heads
    hd = getattr(text, "head_dim", None) or D // H
    Hkv = getattr(text, "num_key_value_heads", None) or H
    return 2 * linear(tokens, D, Hkv * hd)


def forward_flops(
    config,  # a routed family's config (dpvr.routing.backbones)
    routing: DPVRConfig | str,
    split_layer: int | None = None,
    fusion_layers: int | None = None,
    side_depth: int | None = None,
    n_img: int | None = None,
    n_txt: int = 64,
    batch: int = 1,
    n_images: int = 1,
    images: list | None = None,
    logits_tokens: int | None = None,
    **fields,
) -> dict[str, int]:
    """Forward FLOPs of one prefill, split into vision, lm_layers, side, lm_head and total.

    `routing` is the DPVRConfig the prefill runs (split_layer=None: resolved for `config`), or one of
    MODES ('lf' with fusion_layers=0 equals 'lf-ideal') with the paper's s, K, D after it and any other
    DPVRConfig field by keyword (fastv_layer=, fusion_at=, shallow_fastv=, ...). `images` the sizes of
    the prompt's images (dpvr.bench.vision_flops: (h, w) px, or Qwen2-VL's (t, h, w) grid; default:
    n_images of the preset's size); n_img the image-token count (default: what those images become,
    e.g. config.image_seq_length each for LLaVA-1.5); logits_tokens the positions
    lm_head runs on (default: all, as HF's forward; 1 with logits_to_keep=1). `shallow_fastv` (lf, pc,
    kv, vtw): FastV pruning at `fastv_layer` inside the shared layers, so everything after it runs on
    the kept image tokens only."""
    if not isinstance(routing, DPVRConfig):
        routing = _named_routing(routing, split_layer=split_layer, fusion_layers=fusion_layers,
                                 side_depth=side_depth, **fields)  # fmt: skip
    elif fields or (split_layer, fusion_layers, side_depth) != (None, None, None):
        raise TypeError("forward_flops(): a DPVRConfig carries its own fields; pass no routing fields with it")
    cfg = routing.resolve_for(config)
    text = config.text_config
    images = [default_image(config)] * n_images if images is None else list(images)
    n_img = image_tokens(config, images) if n_img is None else n_img
    steps = compile_schedule(cfg, text.num_hidden_layers, has_images=n_img > 0)
    layers, side = schedule_flops(text, steps, n_img, n_txt, cfg.fastv_ratio)
    # lm_head runs on every position (HF's default forward), pruned ones included
    head = linear(n_img + n_txt if logits_tokens is None else logits_tokens, text.hidden_size, text.vocab_size)
    out = {"vision": vision_flops(config, images), "lm_layers": layers, "side": side, "lm_head": head}
    out = {k: batch * v for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def _named_routing(mode: str, **fields) -> DPVRConfig:
    """A mode of MODES ('lf-ideal': lf with no fusion layer) with the fields given (None: the default; the
    split's is derived from the model)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    given = {k: v for k, v in fields.items() if v is not None or k == "split_layer"}
    if mode == "lf-ideal":
        mode, given["fusion_layers"] = "lf", 0
    return DPVRConfig.from_dict({**given, "mode": mode})


def schedule_flops(text, steps: list[Step], n_img: int, n_txt: int, fastv_ratio: float) -> tuple[int, int]:
    """(decoder-layer FLOPs, side-branch FLOPs) of one row running `steps` on n_img image + n_txt text
    tokens: the same steps the executor runs, so the two cannot disagree on a mode."""
    layers = side = 0
    for step in steps:
        n = len(step.layers)
        T = n_img + n_txt
        if step.side:
            side += n * decoder_layer(text, n_img, n_img)
        elif step.image_kv:  # text queries over every key; the image keys/values projected from fixed states
            layers += n * (decoder_layer(text, n_txt, T, kv_tokens=n_txt) + kv_projection(text, n_img))
        else:
            nq = {ALL: T, TEXT: n_txt, IMAGE: n_img}[step.queries]
            layers += n * decoder_layer(text, nq, nq)
        if step.prune:  # the last query's scores over every key, then the dropped tokens are gone
            H = text.num_attention_heads
            layers += 2 * H * (getattr(text, "head_dim", None) or text.hidden_size // H) * T
            n_img -= int(n_img * fastv_ratio)
    return layers, side


# ----------------------------------------------------------------------------- CLI
def flop_counter():
    """A FlopCounterMode that also counts sdpa's CPU flash kernel, with the formula torch registers for
    its GPU flash kernel: torch 2.13's registry misses the CPU one, so attention would count zero there."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    aten, mapping = torch.ops.aten, {}
    cpu_flash = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None and cpu_flash not in flop_registry:
        gpu_formula = flop_registry[aten._scaled_dot_product_flash_attention]

        def formula(*args, **kwargs):
            return gpu_formula(*args, **kwargs)

        formula._get_raw = True  # already takes the raw arguments (FlopCounterMode would wrap it again)
        mapping[cpu_flash] = formula
    return FlopCounterMode(display=False, custom_mapping=mapping)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dpvr.bench.presets import PRESETS, preset_arg

    p.add_argument("--arch", default="llava-1.5-7b", type=preset_arg,
                   help=f"architecture: one of {sorted(PRESETS)} or a routed family's checkpoint folder")  # fmt: skip
    add_routing_arguments(p, ("split_layer", "fusion_layers", "side_depth"))
    p.add_argument("--n-img", type=int, default=None, help="image tokens (default: the preset's, 576 for LLaVA-1.5)")
    p.add_argument("--text-lens", default="32,64,128,256,512,1024")
    p.add_argument("--json", default=None, help="also write the table as JSON here")


def table(config, split: int, K: int, D: int, n_img: int | None, text_lens: list[int]) -> dict:
    rows = {}
    for mode in MODES:
        rows[mode] = {n: forward_flops(config, mode, split, K, D, n_img=n_img, n_txt=n) for n in text_lens}
    return rows


def run(args: argparse.Namespace) -> int:
    from dpvr.bench.presets import preset_config

    config = preset_config(args.arch)
    lens = [int(x) for x in args.text_lens.split(",")]
    rows = table(config, args.split_layer, args.fusion_layers, args.side_depth, args.n_img, lens)
    n_img = args.n_img or image_tokens(config, [default_image(config)])
    print(f"{args.arch}: forward TFLOPs of one prefill ({n_img} image tokens + text), "
          f"s={args.split_layer} K={args.fusion_layers} D={args.side_depth}; saving vs vanilla in brackets")  # fmt: skip
    print(f"{'mode':<10}" + "".join(f"{n:>18}" for n in lens))
    for mode, by_len in rows.items():
        cells = []
        for n in lens:
            tot, van = by_len[n]["total"], rows["vanilla"][n]["total"]
            cells.append(f"{tot / 1e12:8.3f} ({100 * (1 - tot / van):+5.1f}%)")
        print(f"{mode:<10}" + "".join(f"{c:>18}" for c in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "split_layer": args.split_layer, "fusion_layers": args.fusion_layers,
                       "side_depth": args.side_depth, "n_img": n_img,
                       "flops": {m: {str(n): v for n, v in r.items()} for m, r in rows.items()}}, f, indent=2)  # fmt: skip
    return 0
