"""Every forward()/generate() input of a routed model is exact or refused (issue 42): the tables in
dpvr.routing.inputs cover every parameter transformers has, and each entry does what its class says."""
from __future__ import annotations

import inspect

import pytest
import torch
from families import FAMILIES, IMAGE, sample, tiny_vlm
from test_edges import one_line
from tiny import VOCAB, pixels, prompt, tiny_llava
from transformers import DynamicCache, GenerationConfig
from transformers.generation.utils import GenerationMixin
from transformers.utils.generic import TransformersKwargs

from dpvr import DPVRConfig, DPVRError, convert
from dpvr.routing.classes import DPVR_CLASSES
from dpvr.routing.inputs import EXACT, FORWARD_INPUTS, GENERATE_INPUTS, REFUSED
from dpvr.routing.model import RoutedModel

PAIR = ("llava", "qwen2_vl")


def _stock(family):
    return tiny_llava() if family == "llava" else tiny_vlm(family)


def _text(n=9, seed=0):  # ids above every special token of both tiny vocabularies
    return torch.randint(9, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _image_prompt(family, model):
    if family == "llava":
        return {"input_ids": torch.tensor([prompt(3, 4)]), "pixel_values": pixels(1)}
    return sample(family, model, [(3, [0], 4)])[1][0]


def _classified(table):
    return {k for k, v in table.items() if v in (EXACT, REFUSED) or v.startswith("ignored (")}


@pytest.mark.parametrize("family", ["llava", *FAMILIES])
def test_every_forward_parameter_of_every_family_is_classified(family):
    params = set(inspect.signature(DPVR_CLASSES[family].forward).parameters)
    params |= set(inspect.signature(RoutedModel.forward).parameters) | set(TransformersKwargs.__annotations__)
    missing = sorted(params - {"self"} - _classified(FORWARD_INPUTS))
    assert not missing, f"forward inputs with no class in dpvr.routing.inputs.FORWARD_INPUTS: {missing}"


def test_every_generate_parameter_and_generation_field_is_classified():
    params = set(inspect.signature(GenerationMixin.generate).parameters) | set(vars(GenerationConfig()))
    missing = sorted(params - {"self"} - _classified(GENERATE_INPUTS))
    assert not missing, f"generate() inputs with no class in dpvr.routing.inputs.GENERATE_INPUTS: {missing}"


# ---------------------------------------------------------------- exact: text prompts against the stock model
@torch.no_grad()
@pytest.mark.parametrize("family", PAIR)
def test_exact_forward_inputs_give_the_stock_result_on_text(family):
    stock = _stock(family)
    ids, T = _text(), 9
    pos = torch.arange(3, 3 + T)[None] if family == "llava" else torch.arange(3, 3 + T).expand(3, 1, T)
    labels = ids.clone()
    labels[0, :3] = -100
    cases = {  # name -> the forward inputs beyond input_ids
        "position_ids": {"position_ids": pos},
        "logits_to_keep int": {"logits_to_keep": 2},
        "logits_to_keep tensor": {"logits_to_keep": torch.tensor([0, 4, 8])},
        "use_cache": {"use_cache": True},
        "labels, num_items_in_batch": {"labels": labels, "num_items_in_batch": torch.tensor(4)},
        "cache_position": {"cache_position": torch.arange(T), "use_cache": True},
        "output_hidden_states": {"output_hidden_states": True},
        "attention_mask": {"attention_mask": torch.ones_like(ids)},
    }
    want = {name: stock(input_ids=ids, **extra) for name, extra in cases.items()}
    want_tuple = stock(input_ids=ids, labels=labels, return_dict=False)
    model = convert(stock, DPVRConfig(mode="lf", split_layer=3))
    for name, extra in cases.items():
        got = model(input_ids=ids, **extra)
        assert got.logits.shape == want[name].logits.shape, name
        assert torch.allclose(got.logits, want[name].logits, atol=1e-5), name
        if "labels" in extra:
            assert torch.allclose(got.loss, want[name].loss, atol=1e-5), name
        if extra.get("output_hidden_states"):
            assert len(got.hidden_states) == len(want[name].hidden_states) == 7
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got.hidden_states, want[name].hidden_states))
    got_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(got_tuple, tuple) and isinstance(want_tuple, tuple)
    assert torch.allclose(got_tuple[0], want_tuple[0], atol=1e-5) and torch.allclose(got_tuple[1], want_tuple[1], atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("family", PAIR)
def test_exact_cache_and_encoder_inputs_on_an_image_prompt_give_full_recompute(family):
    model = convert(_stock(family), DPVRConfig(mode="lf", split_layer=3))
    inputs = _image_prompt(family, model)
    full = model(**inputs).logits
    ids, T = inputs["input_ids"], inputs["input_ids"].shape[1]
    prefix = {k: (v[:, :-2] if k in ("input_ids", "mm_token_type_ids") else v) for k, v in inputs.items()}
    cache = model(**prefix, use_cache=True).past_key_values
    step = model(input_ids=ids[:, -2:], past_key_values=cache, cache_position=torch.arange(T - 2, T))
    assert torch.allclose(step.logits, full[:, -2:], atol=1e-4), (step.logits - full[:, -2:]).abs().max()
    vision = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
    encoded = {"image": model.model.get_image_features(**vision, return_dict=True)}
    rest = {k: v for k, v in inputs.items() if k != "pixel_values"}  # generate() keeps image_grid_thw (the rope needs it)
    assert torch.allclose(model(**rest, mm_encoder_outputs=encoded).logits, full, atol=1e-6)


# ---------------------------------------------------------------- refused: one line naming the parameter
@torch.no_grad()
@pytest.mark.parametrize("family", PAIR)
def test_refused_forward_inputs_name_themselves_in_one_line(family):
    model = convert(_stock(family), DPVRConfig(mode="lf", split_layer=3))
    inputs = _image_prompt(family, model)
    ids = inputs["input_ids"]
    filled = model(**inputs, use_cache=True).past_key_values
    embeds = model.model.get_input_embeddings()(ids)
    cases = {  # the parameter the message must start with -> the inputs
        "inputs_embeds": dict(inputs, inputs_embeds=embeds),
        "inputs_embeds ": {"inputs_embeds": embeds},
        "past_key_values": dict(inputs, past_key_values=DynamicCache(config=model.config.text_config)),
        "cache_position": dict(inputs, cache_position=torch.arange(1, ids.shape[1] + 1)),
        "cu_seq_lens_q": dict(inputs, cu_seq_lens_q=torch.tensor([0, ids.shape[1]])),
        "flash_attn_kwargs": dict(inputs, flash_attn_kwargs={"x": 1}),
        "pixel_values": {"input_ids": _text(), "pixel_values": inputs["pixel_values"],
                         **{k: v for k, v in inputs.items() if k == "image_grid_thw"}},
        "image input after the prompt": {"input_ids": _text(1), "pixel_values": inputs["pixel_values"], "past_key_values": filled},
        "output_attentions": dict(inputs, output_attentions=True),
    }  # fmt: skip
    if family == "qwen2_vl":
        cases["pixel_values_videos"] = dict(inputs, pixel_values_videos=torch.zeros(4, 24), video_grid_thw=torch.tensor([[1, 2, 2]]))
    for name, given in cases.items():
        with pytest.raises(DPVRError) as exc:
            model(**given)
        msg = one_line(exc)
        assert name.strip() in msg, f"{name}: {msg}"
    with pytest.raises(NotImplementedError, match="output_attentions"):  # still what the stock code catches
        model(**inputs, output_attentions=True)


@torch.no_grad()
def test_an_empty_stock_cache_is_refused_where_routing_would_leave_it_empty():
    """Filled by the stock model, the caller would decode the next token from it; routing returns a
    RoutedCache instead, so the caller's own cache object would stay empty and the next step would run
    as a new prompt."""
    model = convert(tiny_llava(), DPVRConfig(mode="vtw", split_layer=3))
    cache = DynamicCache(config=model.config.text_config)
    with pytest.raises(DPVRError) as exc:
        model(input_ids=_text(), past_key_values=cache)
    assert one_line(exc).startswith("past_key_values: mode 'vtw' cannot continue from a DynamicCache")


# ---------------------------------------------------------------- generate()
REFUSED_SETTINGS = [
    ("cache_implementation", "static"),
    ("prefill_chunk_size", 4),
    ("prompt_lookup_num_tokens", 2),
    ("use_mtp", True),
    ("guidance_scale", 2.0),
    ("penalty_alpha", 0.5),
    ("num_beam_groups", 2),
    ("token_healing", True),
    ("custom_generate", "someone/decoding"),
]


@torch.no_grad()
@pytest.mark.parametrize("name,value", REFUSED_SETTINGS)
def test_refused_generate_settings_name_themselves_in_one_line(name, value):
    model = convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=3))
    inputs = {"input_ids": torch.tensor([prompt(3, 4)]), "pixel_values": pixels(1), "max_new_tokens": 2}
    for how in ("keyword", "generation_config", "model default"):
        model.generation_config = GenerationConfig(**({name: value} if how == "model default" else {}))
        extra = {name: value} if how == "keyword" else {}
        if how == "generation_config":
            extra = {"generation_config": GenerationConfig(**{name: value})}
        with pytest.raises(DPVRError) as exc:
            model.generate(**inputs, **extra)
        assert one_line(exc).startswith(f"{name}="), how


@torch.no_grad()
def test_an_assistant_model_is_refused_by_name():
    model = convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=3))
    with pytest.raises(DPVRError) as exc:
        model.generate(input_ids=torch.tensor([prompt(3, 4)]), pixel_values=pixels(1), assistant_model=model, max_new_tokens=2)
    assert one_line(exc).startswith("assistant_model=DPVRLlavaForConditionalGeneration")


@torch.no_grad()
@pytest.mark.parametrize("family", PAIR)
def test_exact_generate_settings_give_the_stock_generation_on_text(family):
    stock = _stock(family)
    ids = _text()
    settings = [dict(output_hidden_states=True), dict(num_beams=2, num_return_sequences=2), dict(use_cache=False),
                dict(cache_implementation="dynamic"), dict(do_sample=True, top_k=5, seed=0)]  # fmt: skip

    def run(model, extra):
        extra = {"do_sample": False, **extra}
        if "seed" in extra:
            torch.manual_seed(extra.pop("seed"))
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                              return_dict_in_generate=True, output_logits=True, **extra)  # fmt: skip

    want = [run(stock, s) for s in settings]
    model = convert(stock, DPVRConfig(mode="lf", split_layer=3))
    for extra, w in zip(settings, want):
        got = run(model, extra)
        assert torch.equal(got.sequences, w.sequences), extra
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got.logits, w.logits)), extra
        if extra.get("output_hidden_states"):
            flat = lambda out: [h for step in out.hidden_states for h in step]  # noqa: E731
            assert len(flat(got)) == len(flat(w)) == 3 * 7
            assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(flat(got), flat(w)))


@torch.no_grad()
def test_generate_takes_a_tokenizer_as_the_stock_model_does():
    """generate(tokenizer=...) (read by stop_strings; transformers serve always passes one) reaches the forward
    among the model kwargs: ignored there, as the stock forward ignores it."""
    from dpvr.loading import load_model

    model, processor = load_model(mode="vtw", split_layer=6)
    inputs = processor(text="USER: how many cells are there ? ASSISTANT:", return_tensors="pt")
    plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    told = model.generate(**inputs, max_new_tokens=4, do_sample=False, tokenizer=processor.tokenizer)
    assert torch.equal(plain, told)
