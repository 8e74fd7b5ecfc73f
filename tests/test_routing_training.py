"""Gradients flow where the paper says they do, and the default freeze really freezes."""
from __future__ import annotations

import pytest
import torch
from tiny import pixels, prompt, tiny_llava

from dpvr import DPVRConfig, convert


def llava_batch(n_answer: int = 3):
    """One prompt whose labels supervise only the assistant answer (its last n_answer tokens)."""
    ids = torch.tensor([prompt(3, 6 + n_answer)])
    labels = torch.full_like(ids, -100)
    labels[:, -n_answer:] = ids[:, -n_answer:]
    return dict(input_ids=ids, pixel_values=pixels(1), labels=labels)


def side_grad_norm(model) -> float:
    grads = [p.grad for p in model.side_branch.parameters()]
    return sum(float(g.abs().sum()) for g in grads if g is not None)


def test_lf_ideal_side_branch_gets_exactly_zero_gradient():
    # freeze="none" so the loss has a graph at all: with the default freeze nothing upstream is trainable
    model = convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=2, fusion_layers=0, freeze="none"))
    model.train()
    model(**llava_batch()).loss.backward()
    assert side_grad_norm(model) == 0.0, "LF-ideal's side branch received gradient"
    assert model.model.language_model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode,K", [("lf", 1), ("lf", 2), ("pc", 1), ("kv", 1)])
def test_side_branch_gets_gradient(mode, K):
    model = convert(tiny_llava(), DPVRConfig(mode=mode, split_layer=2, fusion_layers=K))
    model.train()
    model(**llava_batch()).loss.backward()
    assert side_grad_norm(model) > 0.0, f"{mode} K={K}: side branch got no gradient"
    frozen_with_grad = [n for n, p in model.named_parameters() if not n.startswith("side_branch") and p.grad is not None]
    assert not frozen_with_grad, f"frozen weights got gradients: {frozen_with_grad[:3]}"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_optimizer_step_changes_only_the_side_branch(checkpointing):
    model = convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=2, fusion_layers=1))
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        opt.zero_grad()
        model(**llava_batch()).loss.backward()
        opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(n.startswith("side_branch.") for n in changed), changed[:5]
    assert len(changed) == len(list(model.side_branch.parameters()))


def test_gradient_checkpointing_matches_plain_backward():
    grads, calls = [], []
    for checkpointing in (False, True):
        model = convert(tiny_llava(), DPVRConfig(mode="kv", split_layer=2))
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        n = []
        model.side_branch[0].self_attn.q_proj.register_forward_hook(lambda *a: n.append(1))
        model(**llava_batch()).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.side_branch.parameters()]))
        calls.append(len(n))
    assert calls == [1, 2], f"side-branch q_proj forward calls (plain, checkpointed) = {calls}: not recomputed"
    diff = (grads[0] - grads[1]).abs().max().item()
    assert diff < 1e-6, f"checkpointed vs plain side-branch grads: max |diff| = {diff:.3e}"


@pytest.mark.parametrize("mode", ["lf", "pc", "kv"])
def test_checkpointing_keeps_the_frozen_shared_stack_out_of_backward(mode):
    """Only the side branch trains: no activation below it may require grad, with or without
    checkpointing (transformers' checkpointing hook would make the input embeddings require it)."""
    for checkpointing in (False, True):
        model = convert(tiny_llava(), DPVRConfig(mode=mode, split_layer=2))
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        seen = []
        for layer in model.model.language_model.layers[:2]:
            layer.mlp.register_forward_hook(lambda mod, args, out: seen.append(out))
        model(**llava_batch()).loss.backward()
        assert seen and not any(t.requires_grad for t in seen), f"{mode} checkpointing={checkpointing}: shared stack in backward"


def test_print_trainable_parameters(capsys):
    model = convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=2))
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    assert trainable == layer and total > trainable
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out
