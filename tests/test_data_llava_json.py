"""LLaVA-665k loader, templates and collator: label masking against a word-by-word reference,
errors naming the sample id, truncation that never cuts image tokens, left/right padding."""
from __future__ import annotations

import pytest
import torch

from dpvr.data.collate import Collator
from dpvr.data.digit_scenes import IMAGE_SIZE
from dpvr.data.llava_json import IGNORE, LlavaJsonDataset, SampleError
from dpvr.data.templates import VICUNA_SYSTEM, render_conversation, render_prompt
from dpvr.embedded.model import N_IMAGE_TOKENS, build_tiny_model
from dpvr.errors import DPVRError


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0)


@pytest.fixture()
def images(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


def sample(sid="s1", image="a.png", turns=(("<image>\nis there a 3 in the image ?", "yes"),)):
    conv = []
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    s = {"id": sid, "conversations": conv}
    if image is not None:
        s["image"] = image
    return s


def reference(processor, turns, has_image, template):
    """Token ids and labels built word by word, without the template renderer or offsets."""
    tok = processor.tokenizer
    ids, labels = [tok.bos_token_id], [IGNORE]
    if template == "vicuna_v1":
        words = VICUNA_SYSTEM.split()
        ids += tok.convert_tokens_to_ids(words)
        labels += [IGNORE] * len(words)
    for k, (q, a) in enumerate(turns):
        prompt = ["USER:"] + (["<image>"] * N_IMAGE_TOKENS if k == 0 and has_image else [])
        prompt += q.replace("<image>", "").split() + ["ASSISTANT:"]
        answer = a.split() + ["</s>"]
        ids += tok.convert_tokens_to_ids(prompt + answer)
        labels += [IGNORE] * len(prompt) + tok.convert_tokens_to_ids(answer)
    return torch.tensor(ids), torch.tensor(labels)


TURNS = (("<image>\nwhich digit is in the top left cell ?", "7"), ("how many digits are in the image ?", "3"),
         ("what is the sum of the top left and top right digits ?", "12"))  # fmt: skip


@pytest.mark.parametrize("template", ["chat", "vicuna_v1"])
@pytest.mark.parametrize("has_image", [True, False])
def test_labels_supervise_only_answers_and_eos(tiny, images, template, has_image):
    _, processor = tiny
    turns = TURNS if has_image else tuple((q.replace("<image>\n", ""), a) for q, a in TURNS)
    ds = LlavaJsonDataset([sample(image="a.png" if has_image else None, turns=turns)], images, processor, template)
    item = ds[0]
    want_ids, want_labels = reference(processor, turns, has_image, template)
    assert torch.equal(item["input_ids"], want_ids), processor.tokenizer.convert_ids_to_tokens(item["input_ids"])
    assert torch.equal(item["labels"], want_labels)
    assert (item["pixel_values"] is not None) == has_image


def test_image_placeholder_moves_to_front(tiny, images):
    _, processor = tiny
    back = LlavaJsonDataset([sample(turns=(("is there a 3 in the image ? <image>", "no"),))], images, processor)[0]
    front = LlavaJsonDataset([sample(turns=(("<image>\nis there a 3 in the image ?", "no"),))], images, processor)[0]
    assert torch.equal(back["input_ids"], front["input_ids"]) and torch.equal(back["labels"], front["labels"])


def test_render_prompt_matches_training_prefix(tiny):
    _, processor = tiny
    q = "which digit is in the top left cell ?"
    for template in ("chat", "vicuna_v1"):
        prompt = render_prompt(processor, q, template)
        text, spans = render_conversation(processor, [(q, "7")], True, template)
        assert text[: spans[0][0]] == prompt, (template, prompt, text)
        assert prompt.endswith("ASSISTANT:") and "<image>\n" + q in prompt
    assert render_prompt(processor, q, "vicuna_v1").startswith(VICUNA_SYSTEM + " USER: ")
    with pytest.raises(DPVRError, match="unknown template"):
        render_prompt(processor, q, "llama3")


@pytest.mark.parametrize(
    "bad, reason",
    [
        (sample(sid="gone-7", image="missing.png"), "missing_image"),
        (sample(sid="junk-3", image="broken.png"), "unreadable_image"),
        ({"id": "noconv-1", "image": "a.png"}, "malformed"),
        ({"id": "order-2", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, "malformed"),
        (sample(sid="two-img-5", turns=(("<image> <image> q", "a"),)), "malformed"),
        (sample(sid="noimg-6", image=None), "malformed"),  # <image> placeholder in a text-only sample
    ],
)
def test_bad_samples_name_their_id_or_are_skipped_and_counted(tiny, images, bad, reason):
    _, processor = tiny
    good = sample(sid="fine")
    with pytest.raises(SampleError, match=rf"sample {bad['id']}: {reason}") as err:
        LlavaJsonDataset([good, bad], images, processor)[1]
    assert len(str(err.value).splitlines()) == 1
    ds = LlavaJsonDataset([good, bad, good], images, processor, on_error="skip")
    assert ds.scan() == {reason: 1} and ds.skipped_ids == {reason: [bad["id"]]}
    batch = Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(3)])
    assert batch["ids"] == ["fine", "fine"], "the skipped sample must be dropped from the batch"


def test_malformed_json_file_is_an_error(tiny, images):
    _, processor = tiny
    (images / "bad.json").write_text('[{"id": "x", "conversations": [}')
    with pytest.raises(DPVRError, match="cannot read LLaVA JSON"):
        LlavaJsonDataset(images / "bad.json", images, processor)


def test_truncation_never_cuts_image_tokens(tiny, images):
    _, processor = tiny
    s = sample(turns=TURNS)
    full = LlavaJsonDataset([s], images, processor)[0]
    image_end = int((full["input_ids"] == processor.image_token_id).nonzero()[-1]) + 1  # 66: <s> USER: then 64
    with pytest.raises(SampleError, match="sample s1: truncation_cuts_image"):
        LlavaJsonDataset([s], images, processor, max_length=image_end - 1)[0]
    skip = LlavaJsonDataset([s], images, processor, max_length=image_end - 1, on_error="skip")
    assert skip[0] is None and skip.skipped == {"truncation_cuts_image": 1}
    # a cut after the image but before any answer leaves nothing to learn from
    with pytest.raises(SampleError, match="no_supervised_tokens"):
        LlavaJsonDataset([s], images, processor, max_length=image_end + 3)[0]
    # a cut inside the second turn keeps every image token and the first answer's labels
    cut = len(full["input_ids"]) - 5
    item = LlavaJsonDataset([s], images, processor, max_length=cut)[0]
    assert len(item["input_ids"]) == cut
    assert int((item["input_ids"] == processor.image_token_id).sum()) == N_IMAGE_TOKENS
    assert torch.equal(item["labels"], full["labels"][:cut])


def test_misaligned_answer_span_is_reported(tiny, images):
    _, processor = tiny
    ds = LlavaJsonDataset([sample()], images, processor)
    text, spans = render_conversation(processor, [("is there a 3 in the image ?", "yes")], False)
    enc = processor.tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    a, b = spans[0]
    with pytest.raises(SampleError, match="labels_misaligned"):  # a span starting inside "yes"
        ds._labels("s1", enc["input_ids"][0], enc["offset_mapping"][0].tolist(), [(a + 2, b)])


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_pads_the_chosen_side(tiny, images, side):
    _, processor = tiny
    pad = processor.tokenizer.pad_token_id
    data = [sample("img"), sample("txt", image=None, turns=(("what is 3 plus 4 ?", "7"),))]
    items = [LlavaJsonDataset(data, images, processor)[i] for i in range(2)]
    batch = Collator(pad, padding_side=side)(items)
    T = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == (2, T) and batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    short = items[1]
    n = len(short["input_ids"])
    cols = slice(T - n, T) if side == "left" else slice(0, n)
    pads = slice(0, T - n) if side == "left" else slice(n, T)
    assert torch.equal(batch["input_ids"][1, cols], short["input_ids"])
    assert (batch["input_ids"][1, pads] == pad).all() and (batch["attention_mask"][1, pads] == 0).all()
    assert (batch["labels"][1, pads] == IGNORE).all() and torch.equal(batch["labels"][1, cols], short["labels"])
    text_only = Collator(pad, padding_side=side)([items[1]])
    assert "pixel_values" not in text_only


def test_mixed_batch_loss_equals_per_sample_losses(tiny, images):
    """Text-only and image samples in one right-padded batch: the batch loss is the token-weighted
    mean of the per-sample losses (images land on the right sample's <image> tokens)."""
    model, processor = tiny
    model.eval()
    data = [sample("a", turns=TURNS), sample("t", image=None, turns=(("what is 3 plus 4 ?", "7"),)),
            sample("b", turns=TURNS[:1])]  # fmt: skip
    items = [LlavaJsonDataset(data, images, processor)[i] for i in range(3)]
    collate = Collator(processor.tokenizer.pad_token_id, keep_ids=False)
    with torch.no_grad():
        batch_loss = model(**collate(items)).loss
        losses, counts = [], []
        for it in items:
            losses.append(model(**collate([it])).loss)
            counts.append(int((it["labels"][1:] != IGNORE).sum()))  # HF shifts labels by one
    want = sum(l * c for l, c in zip(losses, counts)) / sum(counts)
    torch.testing.assert_close(batch_loss, want, rtol=1e-5, atol=1e-5)


def test_a_second_dataset_reads_encoded_samples_back_and_a_changed_rendering_encodes_anew(tiny, images, monkeypatch):
    from dpvr.data import memo

    monkeypatch.setattr("dpvr.data.llava_json.MEMO", memo.EncodedMemo())
    calls = []
    encode = LlavaJsonDataset.encode
    monkeypatch.setattr(LlavaJsonDataset, "encode", lambda self, i: calls.append(i) or encode(self, i))
    data = [sample("a"), sample("b", turns=(("<image>\nhow many 3s ?", "two"),))]
    first = LlavaJsonDataset(data, images, tiny[1])
    items = [first[i] for i in range(2)]
    again = LlavaJsonDataset(list(reversed(data)), images, tiny[1])  # same samples, another order
    for i, item in zip((1, 0), items):
        back = again[i]
        assert back is not item and back.keys() == item.keys()
        assert all(torch.equal(back[k], v) for k, v in item.items() if isinstance(v, torch.Tensor))
    back.pop("input_ids")  # a caller's pop leaves what is kept whole
    assert "input_ids" in again[0] and calls == [0, 1]
    LlavaJsonDataset(data, images, tiny[1], template="vicuna_v1")[0]
    LlavaJsonDataset(data, images, tiny[1], max_length=500)[0]
    assert calls == [0, 1, 0, 0]


def test_the_encoded_samples_kept_stay_within_the_budget(tiny, images, monkeypatch):
    from dpvr.data import memo

    data = [sample(f"s{k}") for k in range(3)]
    size = sum(v.numel() * v.element_size() for v in LlavaJsonDataset(data, images, tiny[1])[0].values()
               if isinstance(v, torch.Tensor))  # fmt: skip
    monkeypatch.setattr("dpvr.data.llava_json.MEMO", kept := memo.EncodedMemo(budget=2 * size))
    ds = LlavaJsonDataset([sample("x", turns=(("<image>\nq ?", "a"),)), *data], images, tiny[1])
    for i in range(len(ds)):
        ds[i]
    assert kept.used <= 2 * size and len(kept._items) < len(ds)
