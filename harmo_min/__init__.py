"""harmo_min: GRPO with hybrid and multi-aspect rewards (HARMO, arXiv 2510.05283) for Qwen2.5-VL."""

__version__ = "0.1.0"
