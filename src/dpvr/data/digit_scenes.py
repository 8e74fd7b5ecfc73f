"""Digit scenes: a small, real, deterministic vision-language benchmark in LLaVA-665k format.

Each scene is a 3x3 grid of cells (48x48 RGB PNG); a cell is empty or holds one of scikit-learn's
1,797 real 8x8 handwritten-digit scans, upscaled 2x and tinted. The scans are split into disjoint
train / val / test pools, so no test image reuses a training scan. Questions follow the paper's
benchmarks (see `FAMILIES`); every sample carries a `meta` dict the metrics read.

    python -m dpvr.cli data --out /tmp/digit-scenes --seed 0      # or: dpvr data ...
    from dpvr.data.digit_scenes import ensure_benchmark; root = ensure_benchmark()

Layout under the output dir: `train.json` (multi-turn instruction tuning, the LLaVA-665k analogue),
`pretrain.json` (one caption per training scene, the LLaVA-558k analogue), `text.json` (the
text-only corpus the language model is pretrained on: scenes written as words, see
`scene_questions.scene_words`), `val.json`, `test.json` (one question per sample),
`images/{split}/{scene}.png`, and `MANIFEST.json` written last.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from dpvr.atomic import locked
from dpvr.data.scene_questions import TEXT_WEIGHTS, SceneQuestions, caption, scene_words, text_only_question
from dpvr.errors import DPVRError

VERSION = "digit-scenes-v4"  # v4: worded cells named, arithmetic in text.json; v3: 3x3 grid, text corpus
GRID = 3  # cells per side
CELL = 16  # pixels per cell (8x8 scan upscaled 2x)
IMAGE_SIZE = GRID * CELL
WORDS_PER_CELL_SIDE = 4  # a worded scene writes a cell as 4x4 words: its tokens under patch 4
EMPTY = -1
P_EMPTY = 0.4
# (name, RGB) tints; the tint is a nuisance the vision tower must ignore
TINTS = [(255, 255, 255), (255, 96, 96), (96, 255, 96), (112, 160, 255), (255, 224, 64)]
FAMILIES = ("pope", "mme", "mmbench", "count", "spatial", "reasoning", "text")
SPLIT_SCENES = {"train": 6000, "val": 100, "test": 100}
TEXT_SCENES = {"existence": 6000, "all": 12000}  # text.json: worded scenes, by TEXT_WEIGHTS part
POOL_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
TRAIN_TURNS = 8  # QA turns per training sample (LLaVA-665k samples are multi-turn)
TEXT_ONLY_SHARE = 0.03  # of training samples; LLaVA-665k has ~40k text-only ShareGPT samples


def default_cache_dir(seed: int = 0) -> Path:
    base = Path(os.environ.get("DPVR_CACHE", Path.home() / ".cache" / "dpvr"))
    return base / f"{VERSION}-seed{seed}"


def scan_pools(seed: int) -> dict[str, np.ndarray]:
    """Disjoint scan indices per split (indices into `load_digits()`)."""
    from sklearn.datasets import load_digits

    n = len(load_digits().target)
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(POOL_FRACTIONS["train"] * n), int(POOL_FRACTIONS["val"] * n)
    return {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}


def digit_popularity(seed: int) -> np.ndarray:
    """Sampling weight per digit (not uniform, so POPE's 'popular' negatives mean something)."""
    order = np.random.default_rng(seed + 1).permutation(10)
    weights = np.empty(10)
    weights[order] = np.linspace(2.0, 0.5, 10)
    return weights / weights.sum()


def similarity_order(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(10, 10) digits sorted by class-mean image distance: row d lists the look-alikes of d first.
    Used for POPE's 'adversarial' negatives (the digit analogue of co-occurring objects)."""
    means = np.stack([images[targets == d].mean(0).ravel() for d in range(10)])  # (10, 64)
    dist = ((means[:, None] - means[None]) ** 2).sum(-1)  # (10, 10)
    np.fill_diagonal(dist, np.inf)
    return np.argsort(dist, axis=1, kind="stable")


def render(cells: list[int], scans: list[int], tints: list[int], images: np.ndarray) -> Image.Image:
    """cells[i] is a digit or EMPTY, scans[i] the scan index, tints[i] an index into TINTS."""
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float64)
    for i, (digit, scan) in enumerate(zip(cells, scans)):
        if digit == EMPTY:
            continue
        ink = np.kron(images[scan] / 16.0, np.ones((2, 2)))  # (16, 16) in [0, 1]
        r, c = divmod(i, GRID)
        colour = np.asarray(TINTS[tints[i]], dtype=np.float64)
        canvas[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = ink[..., None] * colour
    return Image.fromarray(np.round(canvas).astype(np.uint8), mode="RGB")


def _digit(rng: np.random.Generator, weights: np.ndarray) -> int:
    """One cell's content: EMPTY with probability P_EMPTY, else a digit drawn by popularity."""
    return EMPTY if rng.random() < P_EMPTY else int(rng.choice(10, p=weights))


def _asker(seed: int, images: np.ndarray, targets: np.ndarray) -> SceneQuestions:
    """The question builder of every split: popularity and look-alikes come from the train pool."""
    train_pool = scan_pools(seed)["train"]
    return SceneQuestions(
        popular=np.argsort(-digit_popularity(seed), kind="stable"),
        lookalikes=similarity_order(images[train_pool], targets[train_pool]),
    )


def _scene(rng: np.random.Generator, pool: np.ndarray, by_digit: dict[int, np.ndarray], weights: np.ndarray):
    cells, scans, tints = [], [], []
    for _ in range(GRID * GRID):
        digit = _digit(rng, weights)
        if digit == EMPTY:
            cells.append(EMPTY), scans.append(EMPTY), tints.append(0)
            continue
        cells.append(digit)
        scans.append(int(rng.choice(by_digit[digit])))
        tints.append(int(rng.integers(len(TINTS))))
    return cells, scans, tints


def _sample(sid: str, image: str | None, qas: list[dict], meta: dict) -> dict:
    conversations = []
    for k, qa in enumerate(qas):
        prefix = "<image>\n" if (k == 0 and image is not None) else ""
        conversations.append({"from": "human", "value": prefix + qa["question"]})
        conversations.append({"from": "gpt", "value": qa["answer"]})
    sample = {"id": sid}
    if image is not None:
        sample["image"] = image
    sample["conversations"] = conversations
    sample["meta"] = meta
    return sample


def build_split(split: str, seed: int, out: Path, n_scenes: int | None = None) -> list[dict]:
    """Render this split's images under out/images/split and return its samples."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    pool = scan_pools(seed)[split]
    by_digit = {d: pool[targets[pool] == d] for d in range(10)}
    weights = digit_popularity(seed)
    asker = _asker(seed, images, targets)
    rng = np.random.default_rng([seed, list(SPLIT_SCENES).index(split)])
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    samples: list[dict] = []
    for n in range(SPLIT_SCENES[split] if n_scenes is None else n_scenes):
        cells, scans, tints = _scene(rng, pool, by_digit, weights)
        rel = f"{split}/{n:05d}.png"
        render(cells, scans, tints, images).save(out / "images" / rel, format="PNG", optimize=False)
        scene = {"scene": f"{split}-{n:05d}", "cells": cells, "scans": scans, "tints": tints}
        if split == "train":
            qas = asker.training_turns(rng, cells, TRAIN_TURNS)
            meta = {**scene, "family": qas[0]["family"], "answer": qas[0]["answer"], "turns": qas}
            samples.append(_sample(f"{scene['scene']}-qa", rel, qas, meta))
            if rng.random() < TEXT_ONLY_SHARE:
                tqs = [text_only_question(rng) for _ in range(2)]
                samples.append(_sample(f"{scene['scene']}-text", None, tqs, {"family": "text", "answer": tqs[0]["answer"], "turns": tqs}))
            continue
        for k, qa in enumerate(asker.eval_questions(rng, n, cells, scene["scene"])):
            meta = {**scene, **{key: v for key, v in qa.items() if key != "question"}}
            samples.append(_sample(f"{scene['scene']}-{qa['family']}-{k}", rel, [qa], meta))
        if n % 5 == 0:  # a few text-only questions, as LLaVA-665k has
            qa = text_only_question(rng)
            samples.append(_sample(f"{split}-{n:05d}-text", None, [qa], {**qa, "question": None}))
    return samples


def build_pretrain(train: list[dict], seed: int) -> list[dict]:
    """One caption per training scene (projector alignment, the LLaVA-558k analogue)."""
    rng = np.random.default_rng([seed, len(SPLIT_SCENES)])  # a stream of its own, apart from the splits'
    out = []
    for s in train:
        if "image" not in s:
            continue
        qa = caption(rng, s["meta"]["cells"])
        out.append(_sample(s["id"].replace("-qa", "-cap"), s["image"], [qa], {"family": "caption", "answer": qa["answer"]}))
    return out


def build_text(seed: int, sizes: dict[str, int]) -> list[dict]:
    """The text-only corpus: worded scenes (no image) with TRAIN_TURNS questions each, the first
    turn's question after the scene; `meta["part"]` names the TEXT_WEIGHTS mix the turns come from."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    weights = digit_popularity(seed)
    asker = _asker(seed, digits.images, digits.target)
    rng = np.random.default_rng([seed, len(SPLIT_SCENES) + 1])  # a stream of its own
    out = []
    for part, mix in TEXT_WEIGHTS.items():
        for n in range(sizes[part]):
            cells = [_digit(rng, weights) for _ in range(GRID * GRID)]
            qas = asker.training_turns(rng, cells, TRAIN_TURNS, mix)
            # the scene takes the place the image's tokens take in `<image>\n{question}`
            worded = [{**qas[0], "question": f"{scene_words(cells, WORDS_PER_CELL_SIDE)} {qas[0]['question']}"}, *qas[1:]]
            meta = {"family": "worded", "part": part, "cells": cells, "answer": qas[0]["answer"], "turns": qas}
            out.append(_sample(f"text-{part}-{n:05d}", None, worded, meta))
    return out


def _dump(samples: list[dict], path: Path) -> None:
    # one sample per line: valid JSON, diff-able, byte-identical for the same seed
    text = "[\n" + ",\n".join(json.dumps(s, sort_keys=False) for s in samples) + "\n]\n"
    path.write_text(text, encoding="utf-8")


def _is_complete(root: Path, seed: int, scenes: dict[str, int]) -> bool:
    try:
        manifest = json.loads((root / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("version") == VERSION and manifest.get("seed") == seed and manifest.get("scenes") == scenes


def ensure_benchmark(
    out_dir: str | os.PathLike | None = None, seed: int = 0, scenes: dict[str, int] | None = None, progress: bool = True
) -> Path:
    """Write the benchmark under out_dir (default: `default_cache_dir(seed)`, env DPVR_CACHE), or reuse
    it if a complete copy of this version, seed and size is already there. Built in a sibling temp dir
    and renamed into place, so a half-written dir never looks complete; a lock file beside it makes
    concurrent callers (`dpvr data` and `dpvr eval` on a fresh cache) wait for one build and reuse it.
    `scenes` overrides the number of scenes per split (small benchmarks for tests)."""
    sizes = {**SPLIT_SCENES, **TEXT_SCENES, **(scenes or {})}
    root = Path(out_dir) if out_dir is not None else default_cache_dir(seed)
    if _is_complete(root, seed, sizes):
        return root
    with locked(root):
        if _is_complete(root, seed, sizes):  # another process built it while this one waited
            return root
        if root.exists() and any(root.iterdir()):
            raise DPVRError(f"{root} exists but is not a complete {VERSION} seed {seed} benchmark of {sizes} scenes; remove it or pick another --out")
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _build(tmp, seed, sizes, progress)
            if root.exists():
                root.rmdir()  # empty (checked above)
            os.replace(tmp, root)
        finally:  # interrupted or failed: leave no temp dir behind
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _build(tmp: Path, seed: int, sizes: dict[str, int], progress: bool) -> None:
    counts = {}
    splits = list(SPLIT_SCENES)
    if progress:
        from tqdm import tqdm

        splits = tqdm(splits, desc="digit scenes", unit="split")
    for split in splits:
        samples = build_split(split, seed, tmp, sizes[split])
        _dump(samples, tmp / f"{split}.json")
        counts[split] = len(samples)
        if split == "train":
            pre = build_pretrain(samples, seed)
            _dump(pre, tmp / "pretrain.json")
            counts["pretrain"] = len(pre)
    text = build_text(seed, sizes)
    _dump(text, tmp / "text.json")
    counts["text"] = len(text)
    manifest = {"version": VERSION, "seed": seed, "scenes": sizes, "samples": counts, "image_size": IMAGE_SIZE, "grid": GRID}
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")


def open_benchmark(path: str | os.PathLike | None, seed: int = 0) -> Path:
    """An existing benchmark dir (any size; checked by its MANIFEST), or, for None, `ensure_benchmark(seed=seed)`."""
    if path is None:
        return ensure_benchmark(None, seed)
    root = Path(path)
    try:
        manifest = json.loads((root / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        raise DPVRError(f"{root} is not a digit-scenes benchmark (no readable MANIFEST.json); write one with `dpvr data --out {root}`") from None
    if manifest.get("version") != VERSION:
        raise DPVRError(f"{root} holds {manifest.get('version')}, expected {VERSION}; rewrite it with `dpvr data`")
    return root


def load_split(root: str | os.PathLike, split: str) -> list[dict]:
    path = Path(root) / f"{split}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DPVRError(f"cannot read {path}: {exc}") from exc
