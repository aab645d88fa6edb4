"""The `dmoe` command (also `python -m dmoe_triton`).

    dmoe generate                                # the default model on its example problem
    dmoe generate --prompt "(73+2)*7="           # the default: the shipped arithmetic model
    dmoe generate --model DIR --prompt "..." --policy dmoe --top-p 0.6 --guard 16

Loads a LLaDA2 checkpoint directory (config.json, safetensors, tokenizer.json), patches its MoE
layers with the chosen routing policy, decodes with block diffusion and prints the answer,
tokens/s and the unique experts per block, next to token routing's figure on the same prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .config import POLICY_NAMES

DTYPES = ("auto", "bfloat16", "float16", "float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmoe", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    g = commands.add_parser("generate", help="decode an answer to one prompt")
    g.add_argument("--model", help="checkpoint directory (default: the shipped arithmetic "
                                   "model models/arith-dmoe, else a tiny random one)")
    g.add_argument("--prompt", help="required, except for an arithmetic model (default: "
                                    "an example problem)")
    g.add_argument("--raw", action="store_true", help="no chat template: decode after the text")
    g.add_argument("--policy", choices=POLICY_NAMES, default="dmoe")
    g.add_argument("--top-p", type=float, default=0.6, help="dmoe: coreset vote mass")
    g.add_argument("--guard", type=int, default=None,
                   help="dmoe: minimum coreset size (default 16 of 256 experts, scaled to the model)")
    g.add_argument("--block-size", type=int, default=32, help="routing block (dmoe, des_vote)")
    g.add_argument("--size", type=int, default=None,
                   help="des_vote: coreset size (default 15%% of the experts: 38 of 256)")
    g.add_argument("--k", type=int, default=4, help="topk_cap: experts per token")
    g.add_argument("--gen-length", type=int, default=128)
    g.add_argument("--block-length", type=int, default=32, help="diffusion block")
    g.add_argument("--steps", type=int, default=32, help="denoising steps per block at most")
    g.add_argument("--threshold", type=float, default=0.95)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto")
    g.add_argument("--no-compare", action="store_true",
                   help="skip the second run with token routing")
    return parser


def make_policy(args, num_experts: int = 256):
    """The policy of the arguments; guard and size default to the paper's values for 256
    experts (16, and DES's 15% = 38) scaled to the model's `num_experts`."""
    from .config import RoutingPolicy
    from .defaults import scaled_guard, scaled_size

    if args.policy == "dmoe":
        guard = args.guard if args.guard is not None else scaled_guard(num_experts)
        return RoutingPolicy.dmoe(top_p=args.top_p, guard=guard, block_size=args.block_size)
    if args.policy == "des_vote":
        size = args.size if args.size is not None else scaled_size(num_experts)
        return RoutingPolicy.des_vote(size=size, block_size=args.block_size)
    if args.policy == "topk_cap":
        return RoutingPolicy.topk_cap(k=args.k)
    return RoutingPolicy.token()


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template


def _token_text(value) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(model_dir: str):
    """(tokenizers.Tokenizer, tokenizer_config dict) of a checkpoint directory."""
    from tokenizers import Tokenizer

    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"--model {model_dir}: no tokenizer.json in the checkpoint directory")
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
    return Tokenizer.from_file(path), config


def chat_prompt(text: str, tokenizer_config: dict) -> str:
    """The prompt in the checkpoint's chat template (tokenizer_config.json), else our default
    (dmoe_triton.tiny.DEFAULT_CHAT_TEMPLATE: `<role>HUMAN</role>...<|role_end|><role>ASSISTANT</role>`)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from .tiny import DEFAULT_CHAT_TEMPLATE

    template = tokenizer_config.get("chat_template") or DEFAULT_CHAT_TEMPLATE
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()))
    specials = {k: _token_text(tokenizer_config.get(k)) for k in ("bos_token", "eos_token")}
    rendered, _ = render_jinja_template(
        conversations=[[{"role": "user", "content": text}]], chat_template=template,
        add_generation_prompt=True, **{k: v for k, v in specials.items() if v is not None})
    return rendered[0]


# ---------------------------------------------------------------------------------------------
# Model


def resolve_device_dtype(device: Optional[str], dtype: str):
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return device, getattr(torch, dtype)


def load_model(model_dir: str, device, dtype):
    from transformers import AutoModelForCausalLM

    from . import models  # noqa: F401  (registers llada2_moe with the Auto classes)

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"--model {model_dir}: no config.json (expected a checkpoint directory)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()


def _fmt(value, spec=".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_generate(args)
    except (ValueError, TypeError) as err:
        print(f"dmoe: error: {err}", file=sys.stderr)
        return 2


def run_generate(args) -> int:
    import transformers
    from tqdm import tqdm

    from .decoding import generate
    from .patch import patch_model, set_policy
    from .tiny import (ARITHMETIC_NOTE, ARITHMETIC_PROMPT, RANDOM_WEIGHTS_NOTE, default_model_dir,
                       is_arithmetic_model, is_random_default)

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model_dir = args.model or default_model_dir()
    arithmetic = is_arithmetic_model(model_dir)  # raw problems in, no chat template
    if is_random_default(model_dir):
        print(f"note: {RANDOM_WEIGHTS_NOTE}")
    elif arithmetic and not args.model:
        print(f"note: {ARITHMETIC_NOTE}")
    if args.prompt is None:
        if not arithmetic:
            raise ValueError("--prompt is required for this model")
        args.prompt = ARITHMETIC_PROMPT
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    tokenizer, tok_config = load_tokenizer(model_dir)
    raw = args.raw or arithmetic
    if arithmetic:
        from .tasks import encode

        encode(args.prompt)  # a character outside the task's alphabet is a ValueError, not unk
    text = args.prompt if raw else chat_prompt(args.prompt, tok_config)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False).ids
    model = load_model(model_dir, device, dtype)
    policy = make_policy(args, model.config.num_experts)
    patch_model(model, policy, backend=args.backend)
    print(f"model: {model_dir} on {device} ({str(dtype).replace('torch.', '')}), policy: {policy}")

    def decode(policy_name: str):
        bar = tqdm(desc=f"blocks ({policy_name})", unit="block", leave=False)

        def on_block(done, total):
            bar.total = total
            bar.update(done - bar.n)

        try:
            return generate(model, [prompt_ids], gen_length=args.gen_length,
                            block_length=args.block_length, steps=args.steps,
                            threshold=args.threshold, temperature=args.temperature,
                            on_block=on_block)
        finally:
            bar.close()

    result = decode(args.policy)
    st = result.stats
    answer = tokenizer.decode(result.tokens[0], skip_special_tokens=True)
    print("answer:")
    print(answer)
    print(f"tokens/s: {st.tokens_per_s:.1f} ({st.committed_tokens} tokens in {st.wall_time_s:.2f} s, "
          f"{st.forwards} forwards, {st.tokens_per_forward:.2f} tokens/forward, "
          f"{st.time_per_forward_s * 1e3:.2f} ms/forward)")
    line = f"unique experts per block: {_fmt(st.mean_unique_experts)} with {policy}"
    if st.mean_coreset_size is not None:
        line += f" (coreset {_fmt(st.mean_coreset_size)})"
    if args.policy != "token" and not args.no_compare:
        from .config import RoutingPolicy

        set_policy(model, RoutingPolicy.token())
        base = decode("token").stats
        line += (f" vs {_fmt(base.mean_unique_experts)} with token routing "
                 f"({base.tokens_per_s:.1f} tokens/s)")
    print(line)
    if st.peak_memory_bytes is not None:
        print(f"peak GPU memory: {st.peak_memory_bytes / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
