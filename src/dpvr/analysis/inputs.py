"""Which samples the analysis reads: n random image samples of a LLaVA-665k JSON, first QA turn only.

    items, skipped = select_samples("test.json", "images/", processor, n=200, seed=0)
    batch = Collator(pad_token_id, padding_side="right")(items[:8])

Each item is `dpvr.data.llava_json`'s encoding of `USER: <image>\\n{question} ASSISTANT: {answer}</s>`
(the checkpoint's chat template by default): the answer and its end token are the supervised `labels`,
which the masking analysis scores teacher-forced; `meta` and `question` carry the record's own meta
and first question through (the ground-truth attention analysis reads them). Text-only samples and answers longer than
`max_answer_tokens` are skipped and counted (a short answer makes "accuracy" mean "answered correctly").
"""
from __future__ import annotations

import os
import random
from collections import Counter

from dpvr.data.llava_json import IGNORE, LlavaJsonDataset, load_samples
from dpvr.errors import DPVRError


def select_samples(
    data: str | os.PathLike | list[dict],
    images_dir: str | os.PathLike | None,
    processor,
    n: int,
    seed: int = 0,
    template: str = "chat",
    max_answer_tokens: int = 16,
    progress: bool = False,
) -> tuple[list[dict], Counter]:
    """Up to n encoded samples (random order fixed by seed); skipped samples counted by reason."""
    if n < 1:
        raise DPVRError(f"-n must be >= 1, got {n}")
    records = load_samples(data)
    skipped: Counter = Counter()
    first_turns = []
    for k, s in enumerate(records):
        if not isinstance(s, dict) or "image" not in s:
            skipped["text_only"] += 1
            continue
        conv = s.get("conversations")
        first_turns.append({**s, "conversations": conv[:2] if isinstance(conv, list) else conv})
    random.Random(seed).shuffle(first_turns)
    ds = LlavaJsonDataset(first_turns, images_dir, processor, template=template, on_error="skip")
    items: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="encode samples", unit="sample", leave=False)
    for i in range(len(ds)):
        if len(items) == n:
            break
        item = ds[i]
        if item is None:
            continue
        if int((item["labels"] != IGNORE).sum()) > max_answer_tokens:
            skipped["long_answer"] += 1
            continue
        conv = first_turns[i].get("conversations")
        question = conv[0].get("value") if isinstance(conv, list) and conv and isinstance(conv[0], dict) else None
        items.append({**item, "meta": first_turns[i].get("meta"), "question": question})  # a copy: the memo's item stays as it was
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    skipped.update(ds.skipped)
    if not items:
        raise DPVRError(f"no usable image sample in the data (skipped: {dict(skipped) or 'none'})")
    return items, skipped
