"""The routed LLaVA-1.5 as a vLLM model: vLLM's own LLaVA (vision tower, projector, multimodal
processor, Llama layers, KV cache) with a forward that runs the checkpoint's DPVR routing.

Per step, on vLLM's flat batch of every scheduled token (`dpvr.serve.vllm.plan` has the stages):
  - all-token stages run vLLM's layers with the stock attention metadata;
  - text-only stages gather the text rows, run the layers with text-only metadata installed for
    those layers' attention (`dpvr.serve.vllm.metadata`), and scatter them back;
  - on a prefill step with image tokens, the side branch runs on each request's image rows after the
    shared stack, and fusion stages start from its output in the image rows.
Steps where no request holds an image run every layer stock.
"""
from __future__ import annotations

import contextlib
import re
from collections import Counter

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper

from dpvr.serve.vllm.checks import check_engine, raise_refusal
from dpvr.serve.vllm.metadata import ImageCounts, TextStep, text_step
from dpvr.serve.vllm.plan import serving_plan
from dpvr.serve.vllm.side import build_side_branch, run_side_branch


def _checked_info(info):
    """vLLM LLaVA's processing-info factory, first raising the start-up refusal (dpvr.serve.vllm.checks)."""

    def build(ctx):
        raise_refusal(ctx.model_config)
        return info(ctx)

    return build


_LLAVA = LlavaForConditionalGeneration._processor_factory  # what vLLM registered for its LLaVA


@MULTIMODAL_REGISTRY.register_processor(
    _LLAVA.processor, info=_checked_info(_LLAVA.info), dummy_inputs=_LLAVA.dummy_inputs
)
class DPVRLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    # the forward needs the token ids to find the image placeholders among the embeddings
    requires_raw_input_tokens = True

    # dpvr saves what transformers 5.x saves: `model.language_model.*` (`model.language_model.model.*`
    # when the model was loaded from the pre-5.0 layout, as the shipped tiny LLaVA is), a CLIP tower
    # without its `vision_model.` level, and `side_branch.*`, which keeps its name (HF layers, loaded as is)
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={
            re.compile(r"^model\.vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model.",
            re.compile(r"^model\.vision_tower\."): "vision_tower.",
            re.compile(r"^model\.language_model\.(model\.)?"): "language_model.model.",
            re.compile(r"^model\.multi_modal_projector\."): "multi_modal_projector.",
            re.compile(r"^lm_head\."): "language_model.lm_head.",
        }
    )

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        routing = check_engine(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        text_config = vllm_config.model_config.hf_config.text_config
        self.plan = serving_plan(routing, text_config.num_hidden_layers)
        self.act_dtype = vllm_config.model_config.dtype
        self.image_token_id = vllm_config.model_config.hf_config.image_token_index
        if routing.has_side_branch:  # LF-ideal's too: it is in the checkpoint, though never run
            self.side_branch, self.side_rope = build_side_branch(text_config, routing.split_layer, routing.side_depth)
        self.image_counts = ImageCounts()
        # steps run routed, with a prefill beside a decode, with the side branch: what tests and the
        # bench read (through LLM.apply_model) to know the routed paths ran
        self.stats: Counter[str] = Counter()
        # False: every layer on every token, the stock computation on the same weights and engine (the
        # bench's baseline). Switch only between batches: a request's KV layout follows the routing.
        self.routed = True
        layers = self.language_model.model.layers
        self.text_layer_names = [layers[i].self_attn.attn.layer_name for s in self.plan.stages if s.text_only
                                 for i in s.layers]  # fmt: skip

    def load_weights(self, weights) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        lm = self.language_model.model
        h = inputs_embeds if inputs_embeds is not None else lm.embed_input_ids(input_ids)
        step = self._text_step(input_ids) if self.routed else None
        if step is None or step.metadata is None:  # nothing routed: the stock computation
            return lm.norm(self._layers(range(len(lm.layers)), h, positions))
        side = None
        self.stats["routed"] += 1
        self.stats["mixed"] += bool(step.prefill.any() and not step.prefill.all())
        with self._text_metadata(step):
            for stage in self.plan.stages:
                if stage.side_before and step.image_rows.numel():
                    self.stats["side"] += 1
                    side = run_side_branch(self.side_branch, self.side_rope, h[step.image_rows],
                                           positions[step.image_rows], step.image_req)  # fmt: skip
                if stage.images_from_side and side is not None:
                    h = h.index_copy(0, step.image_rows, side)
                if stage.text_only:
                    rows = step.text_rows
                    h = h.index_copy(0, rows, self._layers(stage.layers, h[rows], positions[rows]))
                else:
                    h = self._layers(stage.layers, h, positions)
        return lm.norm(h)

    def _layers(self, layers, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """vLLM's decoder layers in turn; returns the residual stream (vLLM's layers hand it on in two
        parts, the last layer's output and the residual, added by the next layer's fused norm)."""
        residual = None
        for i in layers:
            h, residual = self.language_model.model.layers[i](positions, h, residual)
        return h if residual is None else h + residual

    def _text_step(self, input_ids) -> TextStep | None:
        """This step's token sets and text-only metadata; None on vLLM's warm-up and profiling runs
        (no metadata) and for a plan without text-only layers."""
        metadata = get_forward_context().attn_metadata
        if not self.text_layer_names or not isinstance(metadata, dict) or input_ids is None:
            return None
        stock = metadata.get(self.text_layer_names[0])
        if stock is None:
            return None
        attn = get_forward_context().no_compile_layers[self.text_layer_names[0]]
        return text_step(stock, input_ids == self.image_token_id, self.image_counts, attn, self.act_dtype)

    @contextlib.contextmanager
    def _text_metadata(self, step: TextStep):
        """The text-only metadata and KV slots for the text-only layers' attention, for this forward."""
        ctx = get_forward_context()
        saved = [(n, ctx.attn_metadata[n], ctx.slot_mapping.get(n)) for n in self.text_layer_names]
        for name in self.text_layer_names:
            ctx.attn_metadata[name], ctx.slot_mapping[name] = step.metadata, step.slots
        try:
            yield
        finally:
            for name, meta, slots in saved:
                ctx.attn_metadata[name], ctx.slot_mapping[name] = meta, slots
