"""Serving DPVR checkpoints in inference engines (vLLM: `dpvr.serving.vllm`, loaded through its plugin
entry point). Nothing here is imported by `import dpvr`."""
