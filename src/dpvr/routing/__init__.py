"""Routing: the DPVR classes and convert, the backbone seam, the routed decoder loop, token sets and the routed layer."""
from dpvr.routing.classes import DPVR_CLASSES, DPVRForConditionalGeneration, DPVRLlavaConfig, convert

__all__ = ["DPVR_CLASSES", "DPVRForConditionalGeneration", "DPVRLlavaConfig", "convert"]
