"""Pieces of `dpvr train-tiny`: growing the language model stacks its trained layers, a worded scene and the
vision stage's patch targets put each cell where the image's patch tokens put it."""
from __future__ import annotations

import torch

from dpvr.data.digit_scenes import GRID, WORDS_PER_CELL_SIDE
from dpvr.data.scene_questions import PATCH_WORDS, POSITIONS, scene_words
from dpvr.embedded import build_tiny_model
from dpvr.embedded.model import N_IMAGE_TOKENS, PATCH, TEXT_LAYERS
from dpvr.embedded.stages import patch_targets, grow


def test_grow_stacks_trained_layers_and_every_layer_trains():
    shallow = build_tiny_model(seed=3, text_layers=2)[0].eval()
    deep = grow(shallow, build_tiny_model(seed=4, text_layers=TEXT_LAYERS)[0]).eval()
    short, tall = shallow.model.language_model.layers, deep.model.language_model.layers
    for i, layer in enumerate(tall):  # layer i starts as shallow layer i mod 2
        for (name, p), q in zip(layer.named_parameters(), short[i % 2].parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"layer {i} {name}")
    for name, p in deep.named_parameters():  # everything outside the text layers is copied unchanged
        if ".layers." not in name or "vision_tower" in name:
            torch.testing.assert_close(p, shallow.get_parameter(name), rtol=0, atol=0, msg=name)
    ids = torch.randint(5, shallow.config.text_config.vocab_size, (2, 9))
    with torch.no_grad():  # the copies do work: the stacked model is not the shallow one plus identities
        assert not torch.allclose(deep(input_ids=ids).logits, shallow(input_ids=ids).logits, atol=1e-3)
    deep.train()
    deep(input_ids=ids, labels=ids).loss.backward()
    for layer in tall:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_worded_scene_and_patch_targets_share_the_image_token_layout():
    cells = list(range(GRID * GRID))  # cell i holds digit i
    words = scene_words(cells, WORDS_PER_CELL_SIDE).split()
    side = GRID * WORDS_PER_CELL_SIDE
    assert len(words) == side * side == N_IMAGE_TOKENS
    targets = patch_targets([cells], side)[0]
    assert words == [PATCH_WORDS[t] for t in targets.tolist()]
    # patch (y, x) of a 48-px image lies in cell (y*PATCH // 16, x*PATCH // 16); the cell's first two
    # patches hold its name ("top left"), the others its digit
    per_cell = 16 // PATCH
    for y in range(side):
        for x in range(side):
            cell = (y * PATCH // 16) * GRID + (x * PATCH // 16)
            place = (y % per_cell) * per_cell + x % per_cell
            want = POSITIONS[cell].split()[place] if place < 2 else str(cell)
            assert words[y * side + x] == want, (y, x)
