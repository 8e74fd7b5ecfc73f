"""Prompt templates, shared by training (`llava_json`) and inference/eval, so the two cannot drift.

    render_prompt(processor, "which digit is in the top left cell ?")          # chat (the checkpoint's own)
    -> 'USER: <image>\\nwhich digit is in the top left cell ? ASSISTANT:'
    render_prompt(processor, q, template="vicuna_v1")                          # LLaVA-1.5 training format
    -> 'A chat between ... questions. USER: <image>\\n... ASSISTANT:'
    text, spans = render_conversation(processor, [(q1, a1), (q2, a2)], has_image=True)

`spans` are the character ranges that training supervises: each assistant answer plus its end token
(`</s>`), nothing else. As in LLaVA, `<image>` is moved to the front of the first human turn.
"""
from __future__ import annotations

from dpvr.errors import DPVRError

TEMPLATES = ("chat", "vicuna_v1")
IMAGE = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _check(template: str) -> None:
    if template not in TEMPLATES:
        raise DPVRError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")


def _strip_image(text: str) -> str:
    return text.replace(IMAGE, "").strip()


def _messages(turns: list[tuple[str, str | None]], has_image: bool) -> list[dict]:
    msgs = []
    for k, (question, answer) in enumerate(turns):
        content = [{"type": "image"}] if (k == 0 and has_image) else []
        msgs.append({"role": "user", "content": content + [{"type": "text", "text": _strip_image(question)}]})
        if answer is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def render_prompt(processor, question: str, template: str = "chat", has_image: bool = True) -> str:
    """A generation prompt ending in `ASSISTANT:` for one question (any `<image>` in it is moved to the front)."""
    _check(template)
    if template == "vicuna_v1":
        prefix = f"{IMAGE}\n" if has_image else ""
        return f"{VICUNA_SYSTEM} USER: {prefix}{_strip_image(question)} ASSISTANT:"
    msgs = _messages([(question, None)], has_image)
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def render_conversation(
    processor, turns: list[tuple[str, str]], has_image: bool, template: str = "chat"
) -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end) character span of each supervised answer incl. its end token])."""
    _check(template)
    eos = processor.tokenizer.eos_token
    text, spans = "", []
    if template == "vicuna_v1":
        # LLaVA's conv_vicuna_v1: sep " " after the system prompt and user turns, sep2 "</s>" after answers
        text = VICUNA_SYSTEM + " "
        for k, (question, answer) in enumerate(turns):
            prefix = f"{IMAGE}\n" if (k == 0 and has_image) else ""
            text += f"USER: {prefix}{_strip_image(question)} ASSISTANT:"
            start = len(text)
            text += f" {answer}{eos}"
            spans.append((start, len(text)))
        return text, spans
    # the checkpoint's chat template, rendered turn by turn: an answer is what the full render adds
    # after the generation prompt; the template must be prefix-consistent for this to be well defined
    msgs = _messages(turns, has_image)
    rendered = ""  # the template's own render so far (without our eos insertions)
    for k in range(len(turns)):
        prompt = processor.apply_chat_template(msgs[: 2 * k + 1], add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(msgs[: 2 * k + 2], tokenize=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise DPVRError("chat template is not prefix-consistent across turns; use template='vicuna_v1'")
        text += prompt[len(rendered) :]
        answer = full[len(prompt) :]
        if not answer.rstrip().endswith(eos):
            answer = answer.rstrip() + eos  # llava-hf templates end answers with nothing: supervise an eos
        start = len(text)
        text += answer
        spans.append((start, len(text)))
        rendered = full
    return text, spans
