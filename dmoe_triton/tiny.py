"""The embedded default model: a small LLaDA2 checkpoint with RANDOM weights, built once.

It has the real layout (config.json, sharded bf16 safetensors + index, tokenizer.json from the
`tokenizers` library, tokenizer_config.json with a chat template), so `dmoe generate` with no
`--model` runs the same path as with a published checkpoint. Its answers are noise: it only
shows the machinery (decoding, routing, unique experts per block).

The checkpoint lives under $DMOE_CACHE or ~/.cache/dmoe-triton/. `default_model_dir()` is the one
place that chooses the default model: the trained arithmetic model of issue 6 (models/arith-dmoe
in the repository) when present, this random one otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

NAME = "tiny-llada2-random-v1"
RANDOM_WEIGHTS_NOTE = ("the default model has RANDOM weights (a demonstration of the machinery, "
                       "not a language model); pass --model DIR for a real checkpoint")

# Special tokens of the tiny tokenizer, and the chat format (also our documented default).
EOS, MASK, ROLE_OPEN, ROLE_CLOSE, ROLE_END = "<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% set role = {'user': 'HUMAN', 'assistant': 'ASSISTANT', 'system': 'SYSTEM'}"
    ".get(m['role'], m['role'] | upper) %}"
    "<role>{{ role }}</role>{{ m['content'] }}<|role_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)

TINY_CONFIG = dict(
    hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
    first_k_dense_replace=1, num_experts=64, num_experts_per_tok=8, num_shared_experts=1,
    n_group=8, topk_group=4, routed_scaling_factor=2.5, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5, rope_theta=600000.0,
    max_position_embeddings=4096,
)


def cache_root() -> str:
    return os.environ.get("DMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                        "dmoe-triton")


# The trained arithmetic model of issue 6 (bench/train_tiny.py), shipped in the repository's
# models/ folder beside this package. It is found through this file's location, so a source
# checkout and `pip install -e .` reach it; a wheel install has no models/ and falls back to
# the random model.
SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "models", "arith-dmoe")
ARITHMETIC_NOTE = ("the default model is the shipped arithmetic model (a tiny LLaDA2 MoE trained "
                   "on +, -, * problems, then fine-tuned with dMoE routing; not random): give it "
                   "a problem such as '(73+2)*7=' (characters 0-9 + - * = ( ) only)")
ARITHMETIC_PROMPT = "(73+2)*7="  # a held-out problem: tasks.sample_problems("test", 1, 1)


def shipped_model_dir() -> str | None:
    """models/arith-dmoe of the repository if it holds a checkpoint, else None."""
    files = ("config.json", "model.safetensors", "tokenizer.json")
    if all(os.path.isfile(os.path.join(SHIPPED_MODEL, f)) for f in files):
        return SHIPPED_MODEL
    return None


def is_arithmetic_model(path: str) -> bool:
    """True for a checkpoint of the arithmetic task (its tokenizer_config.json says so): it
    takes raw problems, no chat template."""
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            return json.load(f).get("dmoe_task") == "arithmetic"
    except (OSError, ValueError):
        return False


def default_model_dir() -> str:
    """The checkpoint `dmoe generate` runs without --model: the shipped arithmetic model when
    the repository has it, else the tiny random one (built on first use)."""
    return shipped_model_dir() or tiny_model_dir()


def is_random_default(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "RANDOM_WEIGHTS"))


def tiny_model_dir(root: str | None = None) -> str:
    """Path of the tiny random checkpoint under `root` (default cache_root()), built if absent."""
    path = os.path.join(root or cache_root(), NAME)
    if os.path.isfile(os.path.join(path, "RANDOM_WEIGHTS")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Build beside it, then rename: a concurrent or interrupted build never leaves half a model.
    scratch = tempfile.mkdtemp(prefix=NAME + ".", dir=os.path.dirname(path))
    try:
        build_tiny_checkpoint(scratch)
        try:
            os.rename(scratch, path)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(path, "RANDOM_WEIGHTS")):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def build_tokenizer(specials=(EOS, MASK, ROLE_OPEN, ROLE_CLOSE, ROLE_END), vocab=None,
                    unknown=None):
    """A `tokenizers.Tokenizer` with `specials` as special tokens, for both shipped kinds:

    vocab None (the tiny random model): byte-level, every text encodes. vocab {character: id}
    (the arithmetic task): one token per character, `unknown` for characters outside it.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if vocab is None:
        byte_chars = pre_tokenizers.ByteLevel.alphabet()
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(byte_chars))},
                                   merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
    else:
        tok = Tokenizer(models.WordLevel(vocab, unk_token=unknown))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
        tok.decoder = decoders.Fuse()  # characters join without spaces
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return tok


def build_tiny_checkpoint(directory: str, seed: int = 0) -> str:
    """Write the tiny random checkpoint into `directory`; returns it."""
    import torch

    from .models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM

    tok = build_tokenizer()
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS,
                   "pad_token": EOS, "mask_token": MASK, "chat_template": DEFAULT_CHAT_TEMPLATE},
                  f, indent=2)
    eos, mask = tok.token_to_id(EOS), tok.token_to_id(MASK)
    config = LLaDA2MoeConfig(vocab_size=tok.get_vocab_size(), eos_token_id=eos, pad_token_id=eos,
                             mask_token_id=mask, **TINY_CONFIG)
    torch.manual_seed(seed)
    model = LLaDA2MoeModelLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                # Router logits of order one, so that tokens disagree about experts as in a
                # trained model; a non-zero bias, so that loading it is exercised too.
                layer.mlp.gate.weight.normal_(0, config.hidden_size ** -0.5)
                layer.mlp.gate.expert_bias.normal_(0, 0.01)
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="4MB")
    with open(os.path.join(directory, "RANDOM_WEIGHTS"), "w") as f:
        f.write(RANDOM_WEIGHTS_NOTE + "\n")
    return directory
