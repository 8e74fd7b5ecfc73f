"""The shared-stack cache: a forward that starts from the cached states after layers [0, split) is the
whole forward (logits, loss, side-branch gradients) on every family, and `dpvr train` on the cache
trains the run it trains without it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import FAMILIES, sample, tiny_vlm
from safetensors.torch import load_file
from tiny import IMAGE_TOKEN, left_pad, pixels, prompt, tiny_llava

from dpvr import DPVRConfig, DPVRError, convert
from dpvr.data.digit_scenes import ensure_benchmark
from dpvr.errors import UsageError
from dpvr.routing.schedule import ALL, TEXT, frozen_text_depth, split_schedule
from dpvr.train.cli import train

L = 6
MODES = {
    "lf": DPVRConfig(mode="lf", split_layer=2, fusion_layers=1),
    "lf-K2-D2": DPVRConfig(mode="lf", split_layer=3, fusion_layers=2, side_depth=2),
    "sparse": DPVRConfig(mode="lf", split_layer=1, fusion_at=(2, 4)),
    "pc": DPVRConfig(mode="pc", split_layer=3),
    "kv": DPVRConfig(mode="kv", split_layer=2),
}


def llava_inputs() -> dict:
    rows = [prompt(3, 4, seed=1), prompt(5, 2, n_images=2, seed=2), [7, 8, 9, 10, 11]]  # the last: text only
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(3, seed=3)}


def routed(family: str, cfg: DPVRConfig):
    model = convert(tiny_llava("llama", L) if family == "llava" else tiny_vlm(family, L), cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # a copied side branch equals the layer it came from: make it differ
        for p in model.side_branch.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.train()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["llava", *FAMILIES])
def test_the_forward_from_the_cached_shared_stack_is_the_whole_forward(family, mode):
    model = routed(family, MODES[mode])
    inputs = llava_inputs() if family == "llava" else sample(family, model, [(2, [0, 1], 3), (4, [2], 2), (3, [], 5)])[0]
    image_id = IMAGE_TOKEN if family == "llava" else model.config.image_token_id
    labels = inputs["input_ids"].masked_fill((inputs["input_ids"] == image_id) | ~inputs["attention_mask"].bool(), -100)
    states, pos = model.shared_stack_states(**inputs)
    assert not states.requires_grad  # computed once, outside any graph
    whole = model(**inputs, labels=labels)
    cached = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=pos,
                   shared_states=states, labels=labels)  # fmt: skip
    text = (inputs["input_ids"] != image_id) & inputs["attention_mask"].bool()
    torch.testing.assert_close(cached.logits[text], whole.logits[text], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.loss, whole.loss)
    params = list(model.side_branch.parameters())
    for got, want in zip(torch.autograd.grad(cached.loss, params), torch.autograd.grad(whole.loss, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["llava", *FAMILIES])
def test_a_deeper_split_goes_on_from_a_shallower_splits_states(family):
    """What a split sweep's cache fill does: split 4's states from split 2's, layers 2-3 only; then LF's
    text path (layer 4, before the fusion layer 5) from split 4's states, the text positions only."""
    shallow, deep = (routed(family, DPVRConfig(mode="lf", split_layer=s)) for s in (2, 4))
    inputs = llava_inputs() if family == "llava" else sample(family, deep, [(2, [0, 1], 3), (4, [2], 2), (3, [], 5)])[0]
    states2, pos2 = shallow.shared_stack_states(**inputs, text_path=False)
    want, want_pos = deep.shared_stack_states(**inputs, text_path=False)
    text_only = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    got, pos = deep.shared_stack_states(**text_only, position_ids=pos2, shared_states=states2, from_layer=2, text_path=False)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pos, want_pos)
    assert not torch.allclose(states2[valid], want[valid])  # layers 2-3 did run
    frozen, _ = deep.shared_stack_states(**inputs)
    on, _ = deep.shared_stack_states(**text_only, position_ids=want_pos, shared_states=want, from_layer=4)
    torch.testing.assert_close(on[valid], frozen[valid], rtol=1e-5, atol=1e-5)
    image = inputs["input_ids"] == (IMAGE_TOKEN if family == "llava" else deep.config.image_token_id)
    torch.testing.assert_close(frozen[image], want[image], rtol=0, atol=0)  # the side branch's input: the split's
    assert not torch.allclose(frozen[valid & ~image], want[valid & ~image])  # layer 4 ran on the text
    for bad in ({"from_layer": 5}, {"from_layer": 0}, {"pixel_values": inputs.get("pixel_values", states2)}):
        with pytest.raises(DPVRError, match="shared_states continue a shallower split"):
            deep.shared_stack_states(**text_only, position_ids=pos2, shared_states=states2, **{"from_layer": 2, **bad})


@pytest.mark.parametrize("cfg, depth", [
    (DPVRConfig(mode="lf", split_layer=2, fusion_layers=1), 5),
    (DPVRConfig(mode="lf", split_layer=2, fusion_layers=3), 3),
    (DPVRConfig(mode="lf", split_layer=1, fusion_at=(2, 4)), 2),
    (DPVRConfig(mode="lf", split_layer=2, fusion_layers=0), L),  # LF-ideal: no side branch to read
    (DPVRConfig(mode="vtw", split_layer=2), L),
    (DPVRConfig(mode="pc", split_layer=3), 3),
    (DPVRConfig(mode="kv", split_layer=2), 2),
])  # fmt: skip
def test_the_frozen_part_runs_the_text_path_up_to_the_first_step_reading_the_side_branch(cfg, depth):
    assert frozen_text_depth(cfg, L) == depth
    for has_images in (True, False):
        frozen, rest = split_schedule(cfg, L, has_images)
        assert [i for s in frozen for i in s.layers] == list(range(depth))  # each layer once, in order
        assert [i for s in rest if not s.side for i in s.layers] == list(range(depth, L))
        assert all(s.queries == (TEXT if has_images else ALL) for s in frozen[1:])


def test_modes_without_a_cacheable_shared_stack_are_refused():
    for cfg, why in ((DPVRConfig(mode="lf", split_layer=3, shallow_fastv=True, fastv_layer=1), "shallow_fastv prunes"),
                     (DPVRConfig(mode="fastv"), "has no split"), (DPVRConfig(mode="vanilla"), "has no split")):  # fmt: skip
        with pytest.raises(DPVRError, match=f"no shared stack to cache: .*{why}"):
            split_schedule(cfg, L)
    model = routed("llava", MODES["lf"])
    inputs = llava_inputs()
    states, _ = model.shared_stack_states(**inputs)
    with pytest.raises(DPVRError, match="shared_states replace the images"):
        model(**inputs, shared_states=states)
    with pytest.raises(DPVRError, match="shared_states has shape"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], shared_states=states[:, 1:])


@pytest.fixture(scope="module")
def world(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    data = ensure_benchmark(root / "bench", seed=4, scenes={"train": 6, "val": 2, "test": 2, "existence": 2, "all": 2}, progress=False)
    return tiny_checkpoint, data


def run(world, out: Path, *extra) -> dict:
    root, data = world
    train(["--model", str(root), "--data", str(data / "train.json"), "--eval_data", str(data / "val.json"),
           "--mode", "lf", "--split_layer", "3", "--fusion_layers", "2", "--per_device_train_batch_size", "4",
           "--max_steps", "5", "--learning_rate", "1e-3", "--eval_strategy", "steps", "--eval_steps", "2",
           "--eval_limit", "6", "--logging_steps", "1", "--save_steps", "1000", "--output_dir", str(out),
           "--disable_tqdm", "true", *extra])  # fmt: skip
    return json.loads((out / "final" / "run.json").read_text())


def test_training_on_the_cache_is_the_training_without_it(world, tmp_path):
    cache = tmp_path / "cache"
    plain, on_cache = run(world, tmp_path / "plain"), run(world, tmp_path / "cached", "--shared_stack_cache", str(cache))
    files = sorted(cache.glob("*.safetensors"))  # beside them: the fills' lock files
    # for the training set and the held-out set: the split's states, and LF's text path on to layer 14
    assert sorted(f.name.split("-", 1)[1] for f in files) == ["split3-text14.safetensors"] * 2 + ["split3.safetensors"] * 2
    for key in ("loss", "eval_loss"):
        got = [h[key] for h in on_cache["log_history"] if key in h]
        want = [h[key] for h in plain["log_history"] if key in h]
        assert len(got) == len(want) > 1
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    weights = [load_file(tmp_path / run_ / "final" / "side_branch.safetensors") for run_ in ("plain", "cached")]
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-6)
    stamps = [f.stat().st_mtime_ns for f in files]
    run(world, tmp_path / "seed1", "--shared_stack_cache", str(cache), "--seed", "1", "--side_depth", "2")
    assert sorted(cache.glob("*.safetensors")) == files and [f.stat().st_mtime_ns for f in files] == stamps  # reused
    run(world, tmp_path / "K1", "--shared_stack_cache", str(cache), "--fusion_layers", "1")
    assert [f.stat().st_mtime_ns for f in files] == stamps  # the split's states reused, the text path goes on
    assert len([f for f in cache.glob("*.safetensors") if f.name.endswith("-split3-text15.safetensors")]) == 2
    run(world, tmp_path / "split4", "--shared_stack_cache", str(cache), "--split_layer", "4")
    assert len(list(cache.glob("*.safetensors"))) == 10  # another split: its own states, filled from split 3's
    run(world, tmp_path / "split4-alone", "--shared_stack_cache", str(tmp_path / "alone"), "--split_layer", "4")
    alone = sorted((tmp_path / "alone").glob("*.safetensors"))
    assert len(alone) == 4 and [f.name for f in alone] == sorted(f.name for f in cache.glob("*-split4*.safetensors"))
    for f in alone:  # from split 3's states = from the images
        chained, scratch = load_file(cache / f.name), load_file(f)
        assert chained.keys() == scratch.keys()
        for name in scratch:
            torch.testing.assert_close(chained[name], scratch[name], rtol=1e-5, atol=1e-5)


def test_only_the_dpvr_method_reads_the_cache(world, tmp_path):
    with pytest.raises(UsageError, match="--shared-stack-cache caches DPVR's frozen shared stack; --method lora"):
        run(world, tmp_path, "--method", "lora", "--shared_stack_cache", str(tmp_path / "cache"))


def test_runs_side_by_side_fill_a_split_once(world, tmp_path, monkeypatch):
    """Two runs starting together on one split (seeds under `dpvr reproduce --jobs 2`): one fills, the
    other waits for the file and reads it."""
    import threading
    import time

    from dpvr.train import shared_cache
    from dpvr.train.cli import build_dataset, parse
    from dpvr.train.trainer import build_model

    root, data = world
    margs, dargs, *_ = parse(["--model", str(root), "--data", str(data / "train.json"), "--mode", "lf", "--split_layer", "3",
                             "--output_dir", str(tmp_path / "out")])  # fmt: skip
    model, processor = build_model(margs)
    dataset = build_dataset(dargs, processor)
    fills, fill = [], shared_cache._fill

    def slow_fill(*args, **kwargs):
        fills.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other run to arrive while this one fills
        return fill(*args, **kwargs)

    monkeypatch.setattr(shared_cache, "_fill", slow_fill)
    got = []
    runs = [threading.Thread(target=lambda: got.append(shared_cache.cached(model, dataset, tmp_path / "c", 4)))
            for _ in range(2)]  # fmt: skip
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert len(fills) == 2 and len(got) == 2 and got[0].path == got[1].path  # the split's states, the text path
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2
