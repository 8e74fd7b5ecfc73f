"""Question families for digit scenes, each modelled on one of the paper's benchmarks.

| family    | modelled on   | question (3x3 grid; cells top left .. bottom right)         | answer       |
| --------- | ------------- | ----------------------------------------------------------- | ------------ |
| pope      | POPE          | is there a 7 in the image ?  (random/popular/adversarial)   | yes / no     |
| mme       | MME           | pairs on one image: is the digit in the top left cell a 3 ? | yes / no     |
| mmbench   | MMBench       | which digit is in the top left cell ? A. 3 B. none C. 7 D. 1 | A-D, 4 rotations |
| count     | MME count     | how many digits are in the image ?                          | 0-9          |
| spatial   | position      | which digit is in the top right cell ?                      | 0-9 / none   |
| reasoning | ScienceQA     | sum of two cells / is one cell's digit larger than another  | 0-18 / yes/no |
| text      | text-only     | what is 3 plus 4 ?                                          | number / yes/no |
| caption   | LLaVA-558k    | describe the image .                                        | every cell, named |

A *worded scene* (`scene_tokens`) writes a scene's cells as words in the layout of the image's patch
tokens (each cell a `side` x `side` block of its digit word, in raster order, whose first two words
name the cell: `top left 3 3 / 3 3 3 3 / ...`): the text-only stage of training reads scenes in this
form, and the vision tower learns to say the same word at every patch, so image tokens later take
exactly the words' places.

Questions are space-separated words so the tiny model's word-level tokenizer covers them
(`vocabulary()` lists every word that can appear; a test checks the generated data against it).
"""
from __future__ import annotations

import re

import numpy as np

EMPTY = -1
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "middle", "right")
POSITIONS = [f"{r} {c}" for r in ROWS for c in COLUMNS]  # raster order of the 3x3 grid
LETTERS = ["A", "B", "C", "D"]
NONE = "none"
T = {
    "pope": "is there a {d} in the image ?",
    "mme_position": "is the digit in the {pos} cell a {d} ?",
    "mme_count": "are there {k} digits in the image ?",
    "spatial": "which digit is in the {pos} cell ?",
    "mmbench": "which digit is in the {pos} cell ? A. {o0} B. {o1} C. {o2} D. {o3}",
    "count": "how many digits are in the image ?",
    "sum": "what is the sum of the {pa} and {pb} digits ?",
    "compare": "is the {pa} digit larger than the {pb} digit ?",
    "text_sum": "what is {a} plus {b} ?",
    "text_compare": "is {a} larger than {b} ?",
    "caption": "describe the image .",
}
# LLaVA-1.5's vicuna_v1 system prompt; its words are in the vocabulary so that template is not all <unk>
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLE_WORDS = ["USER:", "ASSISTANT:"]
TRAIN_WEIGHTS = {"pope": 1.5, "mme": 1.0, "mmbench": 1.0, "count": 1.0, "spatial": 2.0, "reasoning": 1.5}
# the text-only corpus: an existence-only part first (the lookup is learnt alone, diluted it is not:
# docs/embedded.md), then every family, captions included (dense: every cell named)
# (the language model learns its arithmetic there too: text-only questions are part of the mix)
TEXT_WEIGHTS = {"existence": {"pope": 1.0}, "all": {**TRAIN_WEIGHTS, "caption": 1.0, "text": 1.0}}


def vocabulary() -> list[str]:
    """Every word a digit-scenes prompt or answer can contain, in a fixed order."""
    words: list[str] = []
    for text in [*T.values(), VICUNA_SYSTEM, " ".join(ROLE_WORDS), " ".join(POSITIONS)]:
        words += re.sub(r"\{\w+\}", " ", text).split()
    words += [str(n) for n in range(19)] + [NONE, "yes", "no", "."] + LETTERS
    return list(dict.fromkeys(words))


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _cell(d: int) -> str:
    return NONE if d == EMPTY else str(d)


def caption(rng: np.random.Generator, cells: list[int]) -> dict:
    """Every cell named with its content, in a random order: a fixed order would let the model copy
    the k-th cell to the k-th slot without ever binding the position words to image regions."""
    answer = " ".join(f"{POSITIONS[i]} {_cell(cells[i])}" for i in rng.permutation(len(cells)))
    return {"family": "caption", "question": T["caption"], "answer": answer}


def patch_cells(grid: int, side: int) -> list[int]:
    """The image-token layout: for each patch of a grid x grid scene whose cells are side x side
    patches, in raster order, the index of the cell it lies in."""
    n = grid * side
    return [(y // side) * grid + x // side for y in range(n) for x in range(n)]


# the words a worded scene (and so an image patch) can hold: digits, none and the cells' names
PATCH_WORDS = list(dict.fromkeys([*map(str, range(10)), NONE, *ROWS, *COLUMNS]))


def scene_tokens(cells: list[int], side: int) -> list[str]:
    """The scene as words in its image-token layout (`patch_cells`): each cell a side x side block of
    its digit word whose first two words are the cell's row and column. Without the names a cell can
    be found only by its distance in the sequence, which the question's place changes in every turn
    (v3 never learnt spatial questions in text: docs/embedded.md)."""
    grid = int(round(len(cells) ** 0.5))
    out = []
    for p, i in enumerate(patch_cells(grid, side)):
        y, x = divmod(p, grid * side)
        place = (y % side) * side + x % side  # raster index inside the cell
        out.append(POSITIONS[i].split()[place] if place < 2 else _cell(cells[i]))
    return out


def scene_words(cells: list[int], side: int) -> str:
    return " ".join(scene_tokens(cells, side))


def text_only_question(rng: np.random.Generator) -> dict:
    a, b = (int(x) for x in rng.integers(0, 10, size=2))
    if rng.random() < 0.5:
        return {"family": "text", "kind": "sum", "question": T["text_sum"].format(a=a, b=b), "answer": str(a + b)}
    return {"family": "text", "kind": "compare", "question": T["text_compare"].format(a=a, b=b), "answer": _yes(a > b)}


class SceneQuestions:
    """Builds questions about one scene. `popular`: digits by training frequency (most first);
    `lookalikes[d]`: other digits by visual similarity to d (most similar first)."""

    def __init__(self, popular: np.ndarray, lookalikes: np.ndarray):
        self.popular = [int(d) for d in popular]
        self.lookalikes = lookalikes

    # ---- one question per family -------------------------------------------------------------
    def pope(self, rng, cells: list[int], positive: bool, subset: str) -> dict:
        present = sorted({d for d in cells if d != EMPTY})
        absent = [d for d in range(10) if d not in present]
        if positive and present:
            d = int(rng.choice(present))
        elif subset == "popular":
            d = next(x for x in self.popular if x in absent)
        elif subset == "adversarial" and present:
            # the absent digit that looks most like some present digit
            ranks = {a: min(int(np.where(self.lookalikes[p] == a)[0][0]) for p in present) for a in absent}
            d = min(absent, key=lambda a: (ranks[a], a))
        else:
            d = int(rng.choice(absent))
        return {"family": "pope", "subset": subset, "question": T["pope"].format(d=d), "answer": _yes(d in present)}

    def mme(self, rng, cells: list[int], positive: bool, category: str) -> dict:
        filled = [i for i, d in enumerate(cells) if d != EMPTY]
        if category == "position" and filled:
            i = int(rng.choice(filled))
            d = cells[i] if positive else int(rng.choice([x for x in range(10) if x != cells[i]]))
            q = T["mme_position"].format(pos=POSITIONS[i], d=d)
        else:
            category, true_k = "count", len(filled)
            k = true_k if positive else int(rng.choice([x for x in range(len(cells) + 1) if x != true_k]))
            q = T["mme_count"].format(k=k)
        return {"family": "mme", "category": category, "question": q, "answer": _yes(positive)}

    def mmbench_options(self, rng, cells: list[int]) -> tuple[int, list[str]]:
        i = int(rng.integers(len(cells)))
        truth = _cell(cells[i])
        others = [x for x in [*map(str, range(10)), NONE] if x != truth]
        options = [truth, *rng.choice(others, size=3, replace=False).tolist()]
        return i, [options[j] for j in rng.permutation(4)]

    def mmbench(self, i: int, options: list[str], truth: str, rotation: int, group: str) -> dict:
        opts = options[rotation:] + options[:rotation]
        q = T["mmbench"].format(pos=POSITIONS[i], o0=opts[0], o1=opts[1], o2=opts[2], o3=opts[3])
        return {"family": "mmbench", "circ_group": group, "rotation": rotation, "options": opts,
                "truth": truth, "question": q, "answer": LETTERS[opts.index(truth)]}  # fmt: skip

    def count(self, cells: list[int]) -> dict:
        k = sum(d != EMPTY for d in cells)
        return {"family": "count", "question": T["count"], "answer": str(k)}

    def spatial(self, rng, cells: list[int]) -> dict:
        filled = [i for i, d in enumerate(cells) if d != EMPTY]
        i = int(rng.choice(filled)) if filled and rng.random() < 0.8 else int(rng.integers(len(cells)))
        return {"family": "spatial", "question": T["spatial"].format(pos=POSITIONS[i]), "answer": _cell(cells[i])}

    def reasoning(self, rng, cells: list[int], kind: str) -> dict | None:
        filled = [i for i, d in enumerate(cells) if d != EMPTY]
        if len(filled) < 2:
            return None
        a, b = (int(x) for x in rng.choice(filled, size=2, replace=False))
        pa, pb = POSITIONS[a], POSITIONS[b]
        if kind == "sum":
            return {"family": "reasoning", "kind": "sum", "question": T["sum"].format(pa=pa, pb=pb),
                    "answer": str(cells[a] + cells[b])}  # fmt: skip
        return {"family": "reasoning", "kind": "compare", "question": T["compare"].format(pa=pa, pb=pb),
                "answer": _yes(cells[a] > cells[b])}  # fmt: skip

    # ---- per split ---------------------------------------------------------------------------
    def training_turns(self, rng, cells: list[int], turns: int, weights: dict[str, float] = TRAIN_WEIGHTS) -> list[dict]:
        names = list(weights)
        p = np.array([weights[n] for n in names])
        out = []
        for name in rng.choice(names, size=turns, p=p / p.sum()):
            positive = bool(rng.random() < 0.5)
            if name == "pope":
                qa = self.pope(rng, cells, positive, str(rng.choice(["random", "popular", "adversarial"])))
            elif name == "mme":
                qa = self.mme(rng, cells, positive, str(rng.choice(["position", "count"])))
            elif name == "mmbench":
                i, options = self.mmbench_options(rng, cells)
                qa = self.mmbench(i, options, _cell(cells[i]), int(rng.integers(4)), "train")
            elif name == "count":
                qa = self.count(cells)
            elif name == "caption":
                qa = caption(rng, cells)
            elif name == "text":
                qa = text_only_question(rng)
            elif name == "reasoning":
                qa = self.reasoning(rng, cells, str(rng.choice(["sum", "compare"]))) or self.spatial(rng, cells)
            else:
                qa = self.spatial(rng, cells)
            out.append(qa)
        return out

    def eval_questions(self, rng, n: int, cells: list[int], scene: str) -> list[dict]:
        """Questions for scene number n of val/test: a POPE yes/no pair (subset cycles with n), an
        MME pair, a counting, a spatial and a reasoning question, and every other scene an MMBench
        circular group (4 rotations). `scene` names the pair / group ids."""
        subset = ["random", "popular", "adversarial"][n % 3]
        qs = [self.pope(rng, cells, True, subset), self.pope(rng, cells, False, subset)]
        category = "position" if n % 2 == 0 else "count"
        pair = [self.mme(rng, cells, True, category), self.mme(rng, cells, False, category)]
        qs += [{**qa, "pair_id": f"{scene}-mme"} for qa in pair]
        if n % 2 == 0:
            i, options = self.mmbench_options(rng, cells)
            qs += [self.mmbench(i, options, _cell(cells[i]), r, f"{scene}-mmb") for r in range(4)]
        qs += [self.count(cells), self.spatial(rng, cells)]
        r = self.reasoning(rng, cells, "sum" if n % 2 == 0 else "compare")
        return qs + ([r] if r else [])
