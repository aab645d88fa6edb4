"""Model implementations. Importing this (or just `import dmoe_triton`) registers them with
transformers' AutoConfig / AutoModel / AutoModelForCausalLM."""
from .llada2 import BlockKVCache, LLaDA2MoeConfig, LLaDA2MoeModel, LLaDA2MoeModelLM

__all__ = ["BlockKVCache", "LLaDA2MoeConfig", "LLaDA2MoeModel", "LLaDA2MoeModelLM"]
