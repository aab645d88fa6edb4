"""Model implementations. Importing this registers them with transformers' Auto classes."""
from .llada2 import BlockKVCache, LLaDA2MoeConfig, LLaDA2MoeModel, LLaDA2MoeModelLM

__all__ = ["BlockKVCache", "LLaDA2MoeConfig", "LLaDA2MoeModel", "LLaDA2MoeModelLM"]
