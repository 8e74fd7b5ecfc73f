"""Training: `dpvr train` (HF Trainer, side branch or baselines) and `dpvr reproduce`."""
