"""Per-layer analysis of a stock LLaVA: the paper's three saturation views and layer-wise masking.

    dpvr analyze --help

    from dpvr.analysis import measure_batch, masking_variants, score_variants, Accumulator, recommend_split
    stats, embeds = measure_batch(model, batch)           # cosine, text->image mass, logit-lens KL per layer
    ll, correct = score_variants(model, embeds, batch, masking_variants(L))

Modules: probe (the attention function), saturation (three views), masking, summary (curves, split
rule), inputs (sample selection), report (JSON/CSV/table), plots (PNG), cli.
"""
from dpvr.analysis.masking import masking_variants, score_variants
from dpvr.analysis.probe import ProbeState, probing
from dpvr.analysis.saturation import BatchStats, measure_batch
from dpvr.analysis.summary import Accumulator, Recommendation, collapse_layer, recommend_split, transition_layer

__all__ = [
    "Accumulator",
    "BatchStats",
    "ProbeState",
    "Recommendation",
    "collapse_layer",
    "masking_variants",
    "measure_batch",
    "probing",
    "recommend_split",
    "score_variants",
    "transition_layer",
]
