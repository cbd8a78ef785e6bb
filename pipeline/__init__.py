"""quantpipe: quantize an LLM several ways, evaluate each variant with lm-eval, gate the deploy."""

__version__ = "0.1.0"
