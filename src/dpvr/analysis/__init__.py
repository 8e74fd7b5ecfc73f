"""Per-layer analysis of a stock LLaVA: the paper's three saturation views and layer-wise masking.

    dpvr analyze --help

    from dpvr.analysis import measure_batch, masking_variants, score_variants, Accumulator, recommend_split
    stats, embeds = measure_batch(model, batch)           # cosine, text->image mass, logit-lens KL per layer
    ll, correct = score_variants(model, embeds, batch, masking_variants(L))

Modules: probe (the attention function), saturation (three views), masking, summary (curves, split
rule), inputs (sample selection), report (JSON/CSV/table), plots (PNG), cli; the attention with
ground truth: grounding (which image tokens a question is about), attention_truth (relevant-cell
share, persistent noise, late review), truth_report, truth_plot.
"""
from dpvr.lazy import lazy_names

MASK_TOL = 0.05  # nats: blocking every layer from the split on may cost at most this much likelihood

_LAZY = {
    "masking_variants": "dpvr.analysis.masking",
    "score_variants": "dpvr.analysis.masking",
    "ProbeState": "dpvr.analysis.probe",
    "probing": "dpvr.analysis.probe",
    "BatchStats": "dpvr.analysis.saturation",
    "measure_batch": "dpvr.analysis.saturation",
    "Accumulator": "dpvr.analysis.summary",
    "Recommendation": "dpvr.analysis.summary",
    "collapse_layer": "dpvr.analysis.summary",
    "recommend_split": "dpvr.analysis.summary",
    "transition_layer": "dpvr.analysis.summary",
}
__all__ = sorted([*_LAZY, "MASK_TOL"])
__getattr__, __dir__ = lazy_names(__name__, _LAZY)
