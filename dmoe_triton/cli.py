"""The `dmoe` command (also `python -m dmoe_triton`).

    dmoe generate                                # the default model on its example problem
    dmoe generate --prompt "(73+2)*7="           # the default: the shipped arithmetic model
    dmoe generate --model DIR --prompt "..." --policy dmoe --top-p 0.6 --guard 16
    dmoe generate --quantize fp8                 # routed + shared experts in FP8 (128x128 blocks)

Loads a LLaDA2 checkpoint directory (config.json, safetensors, tokenizer.json), patches its MoE
layers with the chosen routing policy, decodes with block diffusion and prints the answer,
tokens/s and the unique experts per block, next to token routing's figure on the same prompt.
Each policy's run follows an untimed one-block warm-up, so both figures are steady-state;
tokens/s counts the answer's tokens up to and including its first EOS, not the fill after it.
A missing or broken checkpoint, a bad device or a prompt past max_position_embeddings is one
line `dmoe: error: ...` and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .config import POLICY_NAMES, SCHEDULES

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
    g.add_argument("--policy", choices=("auto",) + POLICY_NAMES, default="auto",
                   help="auto (default): the routing the checkpoint declares (config.json: "
                        "expert_capacity -> capacity, expert_choice_schedule -> expert "
                        "choice (ec_coreset with core_threshold), core_threshold or mode "
                        "'aggregate' -> dmoe, else token); an explicit policy wins")
    g.add_argument("--capacity", type=int, default=None,
                   help="capacity: experts a routing window keeps (default: config.json's "
                        "expert_capacity; LLaDA2.2 ships 48)")
    g.add_argument("--top-p", type=float, default=None,
                   help="dmoe, ec_coreset: coreset vote mass (default 0.6)")
    g.add_argument("--guard", type=int, default=None,
                   help="dmoe, ec_coreset: minimum coreset size (default 16 of 256 experts, "
                        "scaled to the model)")
    g.add_argument("--block-size", type=int, default=None,
                   help="routing window of the block policies (default 32)")
    g.add_argument("--size", type=int, default=None,
                   help="des_vote: coreset size (default 15%% of the experts: 38 of 256)")
    g.add_argument("--k", type=int, default=None,
                   help="topk_cap: experts per token (default 4); expert_choice, ec_coreset "
                        "with the fixed schedule: capacity factor k (default: the model's top-k)")
    g.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="expert_choice, ec_coreset: capacity schedule over the window's mask "
                        "ratio (default fixed: k = the model's top-k)")
    g.add_argument("--k-min", type=int, default=None,
                   help="expert_choice, ec_coreset (linear schedules): k with no token "
                        "masked for linear, all masked for linear_reverse (default top-k / 4; "
                        "with --k-max's default, fewer expert FLOPs than fixed)")
    g.add_argument("--k-max", type=int, default=None,
                   help="expert_choice, ec_coreset (linear schedules): k with all tokens "
                        "masked for linear, none for linear_reverse (default 5 top-k / 4)")
    g.add_argument("--gen-length", type=int, default=None,
                   help="tokens to generate (default: 128, or what fits in the model's "
                        "max_position_embeddings after the prompt)")
    g.add_argument("--block-length", type=int, default=32,
                   help="diffusion block (default %(default)s)")
    g.add_argument("--steps", type=int, default=32,
                   help="denoising steps per block at most (default %(default)s)")
    g.add_argument("--threshold", type=float, default=None,
                   help="commit confidence (default: generation_config.json's threshold, "
                        "else 0.95)")
    g.add_argument("--editing-threshold", type=float, default=None,
                   help="LLaDA2.1 token editing: overwrite written tokens above this "
                        "confidence, in [0, 1] (default: generation_config.json's "
                        "editing_threshold, else no editing)")
    g.add_argument("--max-post-steps", type=int, default=None,
                   help="editing: edit-only steps after a block has no mask (default: "
                        "generation_config.json's max_post_steps, else 16)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0: argmax; above 0: sample (default %(default)s)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto")
    g.add_argument("--quantize", choices=("none", "fp8"), default="none",
                   help="fp8: routed and shared experts to FP8 e4m3 with 128x128 block "
                        "scales at load "
                        "(an FP8 checkpoint's experts are FP8 whatever this says)")
    g.add_argument("--no-compare", action="store_true",
                   help="skip the second run with token routing")
    return parser


def make_policy(args, config) -> tuple:
    """(policy, why): the policy of the arguments; guard and size default to the paper's values
    for 256 experts (16, and DES's 15% = 38) scaled to the model's `num_experts`; "auto" takes
    the checkpoint's own routing (RoutingPolicy.from_config)."""
    from .config import RoutingPolicy
    from .defaults import scaled_guard, scaled_size

    if args.policy == "auto":
        policy = RoutingPolicy.from_config(config)
        keys = [f"{k}={getattr(config, k)}" for k in ("expert_capacity", "expert_choice_schedule",
                                                       "core_threshold", "mode")
                if getattr(config, k, None) not in (None, 0)]
        why = "auto: config.json " + (", ".join(keys) if keys else "declares no block routing")
    else:
        policy, why = _explicit_policy(args, config, scaled_guard, scaled_size), "--policy"
    # "auto" runs the checkpoint's own settings: any routing option given would be ignored.
    _check_policy_options(args, policy.kind, None if args.policy == "auto" else policy.kind, why)
    return policy, why


def _or(value, default):
    """An option's value, or its default when it was not given (0 stays 0: range-checked)."""
    return default if value is None else value


# The routing options each policy reads; one given for another policy is an error, never
# silently ignored.
POLICY_OPTIONS = {
    "token": (), "topk_cap": ("k",), "capacity": ("capacity", "block_size"),
    "dmoe": ("top_p", "guard", "block_size"), "des_vote": ("size", "block_size"),
    "expert_choice": ("schedule", "k", "k_min", "k_max", "block_size"),
    "ec_coreset": ("top_p", "guard", "schedule", "k", "k_min", "k_max", "block_size"),
}


def _check_policy_options(args, kind: str, reads, why: str) -> None:
    """A ValueError naming a routing option that the policy which runs (`kind`, its options
    read from POLICY_OPTIONS[reads]; reads None: none, the checkpoint's own) would ignore."""
    allowed = POLICY_OPTIONS[reads] if reads is not None else ()
    for option in sorted({o for used in POLICY_OPTIONS.values() for o in used}):
        if getattr(args, option) is not None and option not in allowed:
            flag = f"--{option.replace('_', '-')}"
            users = ", ".join(k for k, used in POLICY_OPTIONS.items() if option in used)
            if reads is None:  # auto: the checkpoint's routing runs with its own parameters
                raise ValueError(f"{flag} sets a routing parameter, but --policy auto runs the "
                                 f"checkpoint's own routing with its own parameters ({why}): "
                                 f"pass --policy (one of {users}) to set {flag}")
            raise ValueError(f"{flag} is an option of {users}, but the routing that runs is "
                             f"{kind} ({why}): pass --policy to choose one")


def _explicit_policy(args, config, scaled_guard, scaled_size):
    from .config import RoutingPolicy

    num_experts = config.num_experts
    if args.policy == "capacity":
        capacity = args.capacity if args.capacity is not None else \
            getattr(config, "expert_capacity", None)
        if args.capacity is None and not capacity:  # an explicit --capacity 0 is range-checked
            raise ValueError("--policy capacity on a config without expert_capacity (not a "
                             "LLaDA2.2 checkpoint): pass --capacity N, top_k <= N <= "
                             "num_experts")
        return RoutingPolicy.capacity(capacity, block_size=_or(args.block_size, 32))
    if args.policy == "dmoe":
        guard = args.guard if args.guard is not None else scaled_guard(num_experts)
        return RoutingPolicy.dmoe(top_p=0.6 if args.top_p is None else args.top_p, guard=guard,
                                  block_size=_or(args.block_size, 32))
    if args.policy == "des_vote":
        size = args.size if args.size is not None else scaled_size(num_experts)
        return RoutingPolicy.des_vote(size=size, block_size=_or(args.block_size, 32))
    if args.policy == "topk_cap":
        return RoutingPolicy.topk_cap(k=4 if args.k is None else args.k)
    if args.policy in ("expert_choice", "ec_coreset"):
        return _expert_choice_policy(args, config, scaled_guard)
    return RoutingPolicy.token()


def _expert_choice_policy(args, config, scaled_guard):
    """--policy expert_choice / ec_coreset: the fixed schedule's --k (default the model's top-k),
    or the linear schedules' --k-min / --k-max (default top-k / 4 and 5 top-k / 4, the
    retrofit's range); an option of the other schedule is an error, never ignored. ec_coreset
    takes --top-p and --guard as dmoe does."""
    from .config import RoutingPolicy

    k = config.num_experts_per_tok
    core = (0.6 if args.top_p is None else args.top_p) if args.policy == "ec_coreset" else None
    guard = None  # plain expert choice has no coreset, so no guard
    if core is not None:
        guard = args.guard if args.guard is not None else scaled_guard(config.num_experts)
    block_size, schedule = _or(args.block_size, 32), _or(args.schedule, "fixed")
    if schedule == "fixed":
        if args.k_min is not None or args.k_max is not None:
            raise ValueError("--k-min / --k-max are the linear schedules' ends; --schedule fixed "
                             "(the default) takes --k: pass --schedule linear or linear_reverse")
        return RoutingPolicy.expert_choice(_or(args.k, k), block_size=block_size,
                                           coreset_top_p=core, guard=guard)
    if args.k is not None:
        raise ValueError(f"--k is the fixed schedule's capacity factor; --schedule {schedule} "
                         "takes --k-min / --k-max")
    k_min = args.k_min if args.k_min is not None else max(1, k // 4)
    k_max = args.k_max if args.k_max is not None else k + k // 4
    return RoutingPolicy.expert_choice(None, schedule, k_min, k_max, block_size,
                                       coreset_top_p=core, guard=guard)


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
        config = _read_json(config_path, "the tokenizer config")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        message = " ".join(str(err).split())
        raise ValueError(f"{path}: not a tokenizers tokenizer.json ({message})") from None
    return tokenizer, config


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

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"--device {device}: expected a torch device such as cpu, cuda "
                             f"or cuda:1") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available (this PyTorch build "
                             f"{torch.__version__} or this machine has no GPU); use --device cpu")
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"--device {device}: not usable here ({first}); "
                             f"use --device cpu") from None
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return device, getattr(torch, dtype)


def check_model_dir(model_dir: str) -> None:
    """A ValueError naming the file and what was expected, for a checkpoint directory that
    from_pretrained would fail on with a traceback or an unclear message: no directory, no or
    invalid config.json, a bad index, a missing shard, an empty, truncated or corrupted
    safetensors file. Reads headers only."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"--model {model_dir}: no such directory (expected a checkpoint "
                         f"directory with config.json, safetensors and tokenizer.json)")
    config = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"--model {model_dir}: no config.json (expected a checkpoint directory)")
    _read_json(config, "the model config")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: expected a JSON object with a non-empty \"weight_map\" "
                             f"(tensor name -> shard file)")
        shards = sorted(set(map(str, weight_map.values())))
        for shard in shards:
            if not os.path.isfile(os.path.join(model_dir, shard)):
                raise ValueError(f"{os.path.join(model_dir, shard)}: missing shard (named in "
                                 f"{os.path.basename(index)}, absent from the directory)")
    else:
        shards = ["model.safetensors"]
        if not os.path.isfile(os.path.join(model_dir, shards[0])):
            raise ValueError(f"--model {model_dir}: no model.safetensors (nor "
                             f"model.safetensors.index.json with its shards)")
    for shard in shards:
        _check_safetensors(os.path.join(model_dir, shard))


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: invalid JSON ({err}); expected {what} as a JSON "
                         f"object") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected {what} as a JSON object, got "
                         f"{type(value).__name__}")
    return value


def _check_safetensors(path: str) -> None:
    """Header parsed, and the file as long as the header says (an empty, truncated or
    corrupted-header file is a ValueError naming it)."""
    size = os.path.getsize(path)
    expected = "a safetensors file (8-byte header length, JSON header, tensor data)"
    if size < 8:
        raise ValueError(f"{path}: {size} bytes, truncated or empty; expected {expected}")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} exceeds the file's {size} bytes "
                             f"(truncated or corrupted); expected {expected}")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"{path}: corrupted header (not JSON); expected {expected}") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        raise ValueError(f"{path}: corrupted header (tensor entries without data_offsets); "
                         f"expected {expected}") from None
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated, {size} bytes where the header needs "
                         f"{8 + n + end}; expected {expected}")


def load_model(model_dir: str, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import models  # noqa: F401  (registers llada2_moe with the Auto classes)

    check_model_dir(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, TypeError, KeyError) as err:  # a field the model cannot take
        raise ValueError(f"{os.path.join(model_dir, 'config.json')}: {err}") from None
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype)
    return model.to(device).eval()


def gen_length(requested: Optional[int], prompt_tokens: int, limit) -> int:
    """--gen-length, or by default 128 capped to what fits after the prompt; a ValueError naming
    max_position_embeddings when prompt + gen-length do not fit (past it the model answers
    nothing, or noise)."""
    if not isinstance(limit, int) or isinstance(limit, bool):
        return 128 if requested is None else requested
    wanted = min(128, limit - prompt_tokens) if requested is None else requested
    if (requested is None and wanted < 1) or prompt_tokens + wanted > limit:
        shown = "" if requested is None else f" + --gen-length {requested}"
        raise ValueError(f"the prompt is {prompt_tokens} tokens{shown}, more than the model's "
                         f"max_position_embeddings {limit} allows (prompt tokens + --gen-length "
                         f"<= {limit}): shorten the prompt or --gen-length")
    return wanted


# What generation_config.json may set, and the value without it.
GENERATION_DEFAULTS = {"threshold": 0.95, "editing_threshold": None, "max_post_steps": 16}


def generation_defaults(model_dir: str) -> dict:
    """The decoding knobs a checkpoint's generation_config.json sets (threshold,
    editing_threshold, max_post_steps; LLaDA2.1 ships editing ones), {} without the file. A
    value generate() would refuse is a ValueError naming the file and the key."""
    from .decoding import _check_editing

    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    found = {k: v for k, v in _read_json(path, "the generation config").items()
             if k in GENERATION_DEFAULTS and v is not None}
    try:
        _check_editing(found.get("editing_threshold"), found.get("max_post_steps", 16))
        if not isinstance(found.get("threshold", 0.0), (int, float)):
            raise ValueError(f"threshold must be a number, got {found['threshold']!r}")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return found


def _decoding_args(args, model_dir: str) -> str:
    """Fill --threshold / --editing-threshold / --max-post-steps left unset from the
    checkpoint's generation_config.json, else the defaults; returns what the run says."""
    found = generation_defaults(model_dir)
    for key, default in GENERATION_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, found.get(key, default))
    # Named here, before the model loads and before the run says what it will do.
    from .decoding import _check_editing

    _check_editing(args.editing_threshold, args.max_post_steps)
    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold must be in [0, 1] (a confidence), got {args.threshold}")
    if args.editing_threshold is None:
        return "LLaDA2.0 decoding (no token editing)"
    where = " (generation_config.json)" if "editing_threshold" in found else ""
    return (f"LLaDA2.1 token editing, editing_threshold={args.editing_threshold}{where}, "
            f"max_post_steps={args.max_post_steps}")


def _fmt(value, spec=".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_generate(args)
    except (ValueError, TypeError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__  # one line
        print(f"dmoe: error: {message}", file=sys.stderr)
        return 2


def _timed_decode(model, prompt_ids, args, label: str):
    """generate() under the arguments, with a progress bar; a one-block warm-up first, outside
    the timing (kernels, allocator, caches), so that every policy's figures are steady-state,
    measured under the same conditions."""
    from tqdm import tqdm

    from .decoding import generate, warm_up

    knobs = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                 threshold=args.threshold, temperature=args.temperature,
                 editing_threshold=args.editing_threshold, max_post_steps=args.max_post_steps)
    warm_up(model, [prompt_ids], **knobs)  # the same layout: the timed call captures nothing
    # disable=None: no bar when stderr is not a terminal (a stale bar line would run into the
    # answer in a log that takes both streams)
    bar = tqdm(desc=f"blocks ({label})", unit="block", leave=False, disable=None)

    def on_block(done, total):
        bar.total = total
        bar.update(done - bar.n)

    try:
        return generate(model, [prompt_ids], on_block=on_block, **knobs)
    finally:
        bar.close()


def run_generate(args) -> int:
    import transformers

    from .patch import patch_model, set_policy
    from .tiny import (ARITHMETIC_NOTE, ARITHMETIC_PROMPT, RANDOM_WEIGHTS_NOTE, default_model_dir,
                       is_arithmetic_model, is_random_default)

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model_dir = args.model or default_model_dir()
    check_model_dir(model_dir)  # a missing or broken checkpoint is named before anything else
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
    decoding = _decoding_args(args, model_dir)
    model = load_model(model_dir, device, dtype)
    args.gen_length = gen_length(args.gen_length, len(prompt_ids),
                                 getattr(model.config, "max_position_embeddings", None))
    policy, why = make_policy(args, model.config)
    expert_dtype = None if args.quantize == "none" else args.quantize
    patch_model(model, policy, backend=args.backend, expert_dtype=expert_dtype)
    fp8 = ", FP8 experts" if getattr(model.config, "quantization_config", None) else ""
    print(f"model: {model_dir} on {device} ({str(dtype).replace('torch.', '')}{fp8}), policy: "
          f"{policy} ({why})")
    print(f"decoding: {decoding}")

    result = _timed_decode(model, prompt_ids, args, policy.kind)
    st = result.stats
    answer = tokenizer.decode(result.tokens[0], skip_special_tokens=True)
    print("answer:")
    print(answer)
    # tokens up to and including the first EOS (the fill after it is not counted)
    print(f"tokens/s: {st.tokens_per_s:.1f} ({st.generated_tokens} tokens in {st.wall_time_s:.2f} s, "
          f"{st.forwards} forward{'' if st.forwards == 1 else 's'}, "
          f"{st.tokens_per_forward:.2f} tokens/forward, "
          f"{st.time_per_forward_s * 1e3:.2f} ms/forward"
          f"{f', {st.edits} edits' if args.editing_threshold is not None else ''})")
    line = f"unique experts per block: {_fmt(st.mean_unique_experts)} with {policy}"
    if st.mean_coreset_size is not None:
        line += f" (coreset {_fmt(st.mean_coreset_size)})"
    if policy.kind != "token" and not args.no_compare:
        from .config import RoutingPolicy

        set_policy(model, RoutingPolicy.token())
        base = _timed_decode(model, prompt_ids, args, "token").stats
        line += (f" vs {_fmt(base.mean_unique_experts)} with token routing "
                 f"({base.tokens_per_s:.1f} tokens/s)")
    print(line)
    if st.peak_memory_bytes is not None:
        print(f"peak GPU memory: {st.peak_memory_bytes / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
