"""Routing: the converted model, the routed decoder loop, token sets and the routed layer."""
from dpvr.routing.model import DPVRForConditionalGeneration, DPVRLlavaConfig, convert

__all__ = ["DPVRForConditionalGeneration", "DPVRLlavaConfig", "convert"]
