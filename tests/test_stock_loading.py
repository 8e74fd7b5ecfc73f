"""Loading a DPVR checkpoint with the stock LlavaForConditionalGeneration says, in one line, that the
routing and the side branch are dropped (instead of a type-mismatch warning and an unexpected-keys table)."""
from __future__ import annotations

import logging

from tiny import tiny_llava
from transformers import LlavaForConditionalGeneration

from dpvr import DPVRConfig, DPVRForConditionalGeneration, convert


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_stock_load_of_a_dpvr_checkpoint_warns_in_one_line(tmp_path, caplog):
    convert(tiny_llava(layers=6), DPVRConfig(mode="lf", split_layer=3)).save_pretrained(tmp_path / "dpvr")
    tiny_llava(layers=6).save_pretrained(tmp_path / "stock")
    transformers_log = _Collect()
    logging.getLogger("transformers").addHandler(transformers_log)
    try:
        with caplog.at_level(logging.WARNING, logger="dpvr"):
            stock = LlavaForConditionalGeneration.from_pretrained(tmp_path / "dpvr")
            warned = [r.getMessage() for r in caplog.records if r.name == "dpvr"]
            LlavaForConditionalGeneration.from_pretrained(tmp_path / "stock")  # a stock checkpoint: no word
            routed = DPVRForConditionalGeneration.from_pretrained(tmp_path / "dpvr")  # the right class: no word
    finally:
        logging.getLogger("transformers").removeHandler(transformers_log)
    assert type(stock) is LlavaForConditionalGeneration and routed.side_branch is not None
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert "DPVR checkpoint (mode 'lf')" in warned[0] and "drops the side branch" in warned[0]
    assert [r.getMessage() for r in caplog.records if r.name == "dpvr"] == warned
    assert not [m for m in transformers_log.messages if "dpvr_llava" in m or "UNEXPECTED" in m], transformers_log.messages
