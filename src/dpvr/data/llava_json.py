"""LLaVA-665k-format data: load + validate the JSON, and a torch Dataset that tokenizes lazily.

    samples = load_samples("llava_v1_5_mix665k.json")            # or digit scenes' train.json
    ds = LlavaJsonDataset(samples, images_dir, processor, template="vicuna_v1", max_length=2048, on_error="skip")
    item = ds[0]   # {"id", "input_ids" (T,), "labels" (T,), "attention_mask" (T,), "pixel_values" (1, 3, H, W) | None,
                   #  and the family's other image inputs: image_sizes, image_grid_thw, mm_token_type_ids (T,)}
    ds.scan(); print(ds.skipped)   # eager pass: Counter of skipped samples by reason

Sample format: `{"id", "image"?: path relative to images_dir, "conversations": [{"from": "human"|"gpt",
"value"}, ...]}`; human and gpt alternate, human first; exactly one `<image>` in an image sample, none
in a text-only one (LLaVA-1.5 is single-image). Labels are -100 except on assistant answers and their
`</s>` (see `templates.render_conversation`). Images are opened only in `__getitem__`.

Errors (`on_error="raise"`, the default) are a one-line DPVRError naming the sample id; with
`on_error="skip"` the sample yields None (the collator drops it) and `skipped[reason]` counts it, once
however many epochs meet it. Reasons: malformed, missing_image, unreadable_image,
truncation_cuts_image, labels_misaligned, no_supervised_tokens. Counters live in the process that read
the sample; with DataLoader workers, `skip_markers=True` makes a skipped sample yield a marker
`{"skipped": reason, "id", "index"}` instead, which the collator passes on as `batch["skipped"]` for the
main process to `record_skip` (DPVRTrainer does).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image

from dpvr.data.collate import IGNORE, IMAGE_KEYS, TOKEN_KEYS
from dpvr.data.memo import MEMO, memo_key
from dpvr.data.templates import IMAGE, render_conversation
from dpvr.errors import DPVRError

REASONS = ("malformed", "missing_image", "unreadable_image", "truncation_cuts_image", "labels_misaligned",
           "no_supervised_tokens")  # fmt: skip
IMAGE_LENGTH_GUESS = 576  # LLaVA-1.5's image tokens; the length estimate only has to rank image above text-only


class SampleError(DPVRError):
    def __init__(self, sid, reason: str, detail: str):
        super().__init__(f"sample {sid}: {reason}: {detail}")
        self.reason = reason


def validate_sample(s, index: int) -> None:
    """Raise SampleError(reason='malformed') if s is not a well-formed LLaVA-665k sample."""
    sid = s.get("id", f"#{index}") if isinstance(s, dict) else f"#{index}"
    bad = lambda detail: SampleError(sid, "malformed", detail)  # noqa: E731
    if not isinstance(s, dict) or "id" not in s:
        raise bad("not an object with an 'id'")
    conv = s.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise bad("'conversations' must be a non-empty list")
    for k, turn in enumerate(conv):
        want = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want or not isinstance(turn.get("value"), str):
            raise bad(f"turn {k} must be {{'from': '{want}', 'value': str}}")
    if len(conv) % 2:
        raise bad("the last turn is a human turn with no gpt answer")
    if "image" in s and not isinstance(s["image"], str):
        raise bad("'image' must be a relative path string")
    n_img = sum(t["value"].count(IMAGE) for t in conv)
    if n_img != (1 if "image" in s else 0):
        raise bad(f"{n_img} {IMAGE} placeholders for {'one image' if 'image' in s else 'a text-only sample'}")


def load_samples(data: str | os.PathLike | list[dict]) -> list[dict]:
    """Read a LLaVA-665k JSON file (or take a list); structure is checked per sample by the dataset."""
    if isinstance(data, list):
        return data
    try:
        samples = json.loads(Path(data).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DPVRError(f"cannot read LLaVA JSON {data}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(samples, list):
        raise DPVRError(f"{data}: top level must be a list of samples")
    return samples


class LlavaJsonDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        data: str | os.PathLike | list[dict],
        images_dir: str | os.PathLike | None,
        processor,
        template: str = "chat",
        max_length: int | None = None,
        on_error: str = "raise",
        skip_markers: bool = False,
    ):
        if on_error not in ("raise", "skip"):
            raise DPVRError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.samples = load_samples(data)
        self.images_dir = Path(images_dir) if images_dir is not None else None
        self.processor, self.template, self.max_length, self.on_error = processor, template, max_length, on_error
        self.skip_markers = skip_markers
        self.skipped: Counter = Counter()
        self.skipped_ids: dict[str, list] = {}
        self._skipped_at: set[int] = set()  # indices counted, so a second epoch does not count them again

    def __len__(self) -> int:
        return len(self.samples)

    @cached_property
    def lengths(self) -> list[int]:
        """A length estimate per sample, for grouping batches by length without encoding anything:
        words in the conversation, plus IMAGE_LENGTH_GUESS for an image (LLaVA's modality-length rule;
        only the order matters). A malformed sample counts 0 and fails when it is read."""
        def words(s) -> int:
            try:
                return sum(len(t["value"].split()) for t in s["conversations"]) + IMAGE_LENGTH_GUESS * ("image" in s)
            except (TypeError, KeyError, AttributeError):
                return 0
        return [words(s) for s in self.samples]

    @cached_property
    def memo_key(self) -> str:
        return memo_key(self.images_dir, self.processor, self.template, self.max_length)

    def __getitem__(self, i: int) -> dict | None:
        try:
            return MEMO.read(self.memo_key, self.samples[i], lambda: self.encode(i))  # encoded once per process
        except SampleError as exc:
            if self.on_error == "raise":
                raise
            sid = self.samples[i].get("id") if isinstance(self.samples[i], dict) else i
            self.record_skip(exc.reason, sid, i)
            return {"skipped": exc.reason, "id": sid, "index": i} if self.skip_markers else None

    def record_skip(self, reason: str, sid, index: int) -> None:
        """Count skipped sample `index` under `reason`, once."""
        if index not in self._skipped_at:
            self._skipped_at.add(index)
            self.skipped[reason] += 1
            self.skipped_ids.setdefault(reason, []).append(sid)

    def scan(self) -> Counter:
        """Encode every sample once (eagerly) so `skipped` counts the whole file; returns it."""
        self.skipped.clear(), self.skipped_ids.clear(), self._skipped_at.clear()
        for i in range(len(self)):
            self[i]
        return self.skipped

    def load_image(self, s: dict) -> Image.Image:
        if self.images_dir is None:
            raise SampleError(s["id"], "missing_image", "the dataset was given no images_dir")
        path = self.images_dir / s["image"]
        if not path.is_file():
            raise SampleError(s["id"], "missing_image", f"{path} does not exist")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as exc:  # PIL raises several types for corrupt files
            raise SampleError(s["id"], "unreadable_image", f"{path}: {type(exc).__name__}") from exc

    def encode(self, i: int) -> dict:
        s = self.samples[i]
        validate_sample(s, i)
        sid, conv, has_image = s["id"], s["conversations"], "image" in s
        turns = [(conv[k]["value"], conv[k + 1]["value"]) for k in range(0, len(conv), 2)]
        text, spans = render_conversation(self.processor, turns, has_image, self.template)
        tok = self.processor.tokenizer
        images = {}
        if has_image:
            image = self.load_image(s)
            enc = self.processor(text=text, images=image, return_offsets_mapping=True, return_tensors="pt")
            # pixel_values (1, 3, H, W), or (1, crops, 3, H, W) with image_sizes (anyres), or Qwen2-VL's
            # patches with image_grid_thw: whatever the family's processor hands its model
            images = {k: enc[k] for k in (*IMAGE_KEYS, *TOKEN_KEYS) if k in enc}
            ids = enc["input_ids"][0]
            # the processor expanded its image placeholder into n copies before tokenizing: shift spans after it
            placeholder = getattr(self.processor, "image_token", IMAGE)
            n_img = int((ids == self.processor.image_token_id).sum())
            at, grow = text.index(placeholder), (n_img - 1) * len(placeholder)
            spans = [(a + grow, b + grow) if a > at else (a, b) for a, b in spans]
        else:
            enc = tok(text, return_offsets_mapping=True, return_tensors="pt")
            ids = enc["input_ids"][0]
        offsets = enc["offset_mapping"][0].tolist()
        labels = self._labels(sid, ids, offsets, spans)
        return self._truncate(sid, ids, labels, images)

    def _labels(self, sid, ids: torch.Tensor, offsets: list, spans: list[tuple[int, int]]) -> torch.Tensor:
        """Copy ids onto tokens inside an answer span; a token crossing a span edge means the tokenizer
        merged answer and prompt text, so the sample's labels cannot be aligned."""
        labels = torch.full_like(ids, IGNORE)
        eos_id = self.processor.tokenizer.eos_token_id
        for a, b in spans:
            inside = [t for t, (x, y) in enumerate(offsets) if y > x and x >= a and y <= b]
            crossing = [t for t, (x, y) in enumerate(offsets) if y > x and x < b and y > a and not (x >= a and y <= b)]
            if crossing or not inside:
                raise SampleError(sid, "labels_misaligned", f"answer span {a}:{b} {'crosses a token' if crossing else 'has no tokens'}")
            if int(ids[inside[-1]]) != eos_id:
                raise SampleError(sid, "labels_misaligned", f"answer span {a}:{b} does not end in the eos token")
            labels[inside] = ids[inside]
        return labels

    def _truncate(self, sid, ids: torch.Tensor, labels: torch.Tensor, images: dict) -> dict:
        if self.max_length is not None and len(ids) > self.max_length:
            image_pos = (ids == self.processor.image_token_id).nonzero()
            if len(image_pos) and int(image_pos[-1]) >= self.max_length:
                raise SampleError(sid, "truncation_cuts_image", f"{len(ids)} tokens > max_length {self.max_length} and the cut falls in the image tokens")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if not (labels != IGNORE).any():
            raise SampleError(sid, "no_supervised_tokens", f"no answer token left within max_length {self.max_length}")
        item = {"id": sid, "input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "pixel_values": None}
        item.update({k: v for k, v in images.items() if k not in TOKEN_KEYS})
        item.update({k: images[k][0][: len(ids)] for k in TOKEN_KEYS if k in images})  # per token, like input_ids
        return item
