"""Ground truth for the attention analysis: which image tokens a digit-scenes question is about.

    cells = relevant_cells(meta, question)       # e.g. [7] for "which digit is in the bottom middle cell ?"
    cell_of = token_cells(144)                   # (144,) cell index of each image token (12 x 12 patches, 3 x 3 cells)
    mask = relevant_tokens(meta, question, 144)  # (144,) bool, or None: no ground truth for this sample
    q = answer_query_positions(labels)           # (B,) the last prompt token: the query that predicts the answer
    at = query_mask(input_ids, labels, image_token_id, "answer")   # (B, T) bool: the queries measure_batch keeps

A digit scene (`dpvr.data.digit_scenes`) is a GRID x GRID grid of cells; `meta["cells"]` holds each
cell's digit (or -1, empty) in raster order, and the question names its cells in words
(`scene_questions.POSITIONS`). The LLaVA vision tower cuts the image into a square patch grid and
(CLS dropped) hands one image token per patch, in raster order, so patch (y, x) lies in cell
(y // side, x // side) with side = patches per cell (`scene_questions.patch_cells`). The data records
no cell index for a question, so it is read back from the question's words, by family:

| family / kind           | relevant cells                                     |
| ----------------------- | -------------------------------------------------- |
| spatial, mmbench, mme position, reasoning | the cells the question names     |
| pope, answer yes        | the cells that hold the asked digit                |
| count, mme count        | the filled cells (what is counted)                 |
| pope no, text, caption, anything else | none: no ground truth (the sample counts only for the noise) |
"""
from __future__ import annotations

import re

import numpy as np
import torch

from dpvr.data.collate import IGNORE
from dpvr.data.scene_questions import EMPTY, POSITIONS, patch_cells

GRID = 3  # cells per side of a digit scene (digit_scenes.GRID; kept here so analysis needs no sklearn import)
_NAMED = re.compile(r"\b(top|middle|bottom) (left|middle|right)\b")
_POPE = re.compile(r"is there a (\d) in the image")
_COUNT = re.compile(r"how many digits|are there \d+ digits")


def relevant_cells(meta: dict | None, question: str | None) -> list[int] | None:
    """Cell indices (raster order) the question is about; None when the sample has no ground truth."""
    if not isinstance(meta, dict) or not isinstance(question, str):
        return None
    cells = meta.get("cells")
    if not isinstance(cells, list) or len(cells) != GRID * GRID:
        return None
    question = question.replace("<image>", " ")
    if _COUNT.search(question):
        found = [i for i, d in enumerate(cells) if d != EMPTY]
    elif m := _POPE.search(question):
        found = [i for i, d in enumerate(cells) if d == int(m.group(1))]
    else:
        found = [POSITIONS.index(" ".join(m.groups())) for m in _NAMED.finditer(question)]
    return sorted(set(found)) or None  # nothing to look at (absent digit, empty scene): no ground truth


def token_cells(n_image_tokens: int, grid: int = GRID) -> np.ndarray | None:
    """(N,) cell index of each image token, or None when N tokens are not a square patch grid that
    the cell grid divides (another vision tower or anyres tiling: no mapping is claimed)."""
    n = int(round(n_image_tokens**0.5))
    if n * n != n_image_tokens or n % grid:
        return None
    return np.asarray(patch_cells(grid, n // grid))


def patch_grid_tokens(config) -> int | None:
    """How many image tokens a plain LLaVA gives one image: one per patch in raster order, CLS dropped
    ("default" strategy). None for every other layout (anyres tiles with newline tokens, Qwen2-VL's
    merged patches, CLS kept), where a square token count would be a coincidence, not a patch grid."""
    v = getattr(config, "vision_config", None)
    if getattr(config, "model_type", None) != "llava" or v is None or config.vision_feature_select_strategy != "default":
        return None
    return (v.image_size // v.patch_size) ** 2


def relevant_tokens(meta: dict | None, question: str | None, n_image_tokens: int) -> np.ndarray | None:
    """(N,) bool: the image tokens covering the question's cells; None without ground truth."""
    cells, cell_of = relevant_cells(meta, question), token_cells(n_image_tokens)
    if cells is None or cell_of is None:
        return None
    return np.isin(cell_of, cells)


def answer_query_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B,) position of the last prompt token of each row (the query whose output predicts the first
    answer token); -1 for a row without labels."""
    has = labels != IGNORE  # (B, T)
    first = has.int().argmax(-1)  # first labelled position (0 if none)
    return torch.where(has.any(-1), first - 1, torch.full_like(first, -1))


QUERIES = ("answer", "question")


def query_mask(input_ids: torch.Tensor, labels: torch.Tensor, image_token_id: int, which: str) -> torch.Tensor:
    """(B, T) bool: "answer" = the last prompt token; "question" = every text position after the
    (last) image token up to and including it (the question, the role words, the answer's query)."""
    q = answer_query_positions(labels)  # (B,)
    t = torch.arange(labels.shape[1])[None]  # (1, T)
    if which == "answer":
        return t == q[:, None]
    image = input_ids == image_token_id
    last_image = torch.where(image.any(-1), (image * t).max(-1).values, torch.full_like(q, labels.shape[1]))
    return (t > last_image[:, None]) & (t <= q[:, None])
