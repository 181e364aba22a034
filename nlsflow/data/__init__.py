"""Training and evaluation data: LLM-Adapters formats, the registry of files with digests, contamination checks."""
