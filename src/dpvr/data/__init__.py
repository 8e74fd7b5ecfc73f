"""Data: the digit-scenes benchmark and the LLaVA-665k-format pipeline (loader, templates, collator)."""
