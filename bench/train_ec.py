"""Expert-choice retrofit of the tiny arithmetic model (issue 15 item 3).

    python bench/train_ec.py --out OUT          # models/arith-token -> four EC variants (GPU)
    bash bench/train_ec.sh OUT                  # the same, logged; DMOE_SMOKE=1: CPU smoke

From the token-trained checkpoint (models/arith-token), the routing rule is replaced by expert
choice (docs/routing.md, Expert choice) and the model fine-tuned in two stages: the router
only (gate weights), then the router and the experts (routed and shared), with the plain
masked-token loss of dmoe_triton/training.py (expert_bias frozen). Four variants at matched
expert FLOPs (k = the model's top_k tokens' worth of experts per row on average): plain expert
choice and expert choice inside the dMoE coreset (p = 0.6), each with a fixed k and with
linear_reverse capacity (k from k / 4 at an all-masked window to 5 k / 4 at none masked: the
mean over decoding's forwards comes near k; the pairs column shows the match).

Every variant (before fine-tuning, after the router stage, after both) and the baselines (token
routing on arith-token; dMoE p=0.6 on the shipped arith-dmoe) decode the same held-out test
problems through the inference path (patched model: fused routing + MoE kernels on the GPU).
Per row: exact-match accuracy, unique experts per block, the most rows of the block one expert
processes (balance), routed token-expert pairs and expert FLOPs per block (6 * H * I a pair:
gate, up, down), all averaged over MoE layers, denoising forwards and problems.

Writes OUT/ec.md (table), OUT/ec.json and OUT/models/<variant>/ (each variant's final
checkpoint, its config declaring its routing so that `dmoe generate --model` runs it).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from dmoe_triton import RoutingPolicy, tasks, training
from dmoe_triton.defaults import scaled_guard
from dmoe_triton.models import LLaDA2MoeModelLM

TOP_P = 0.6


def variants(config, lr_range):
    """(name, policy for training, policy for evaluation): guard 12/256 of E in training and
    16/256 in evaluation, as the dMoE fine-tune (dmoe_triton/training.py). lr_range: (k_min,
    k_max) of linear_reverse, default (k / 4, 5 k / 4): decoding spends most forwards with
    little of the window masked (the prompt's rows count as unmasked), so the mean k lands
    near the fixed k (the table's pairs column shows how near)."""
    k = config.num_experts_per_tok
    k_min, k_max = lr_range or (max(1, k // 4), k + k // 4)
    out = []
    for core in (None, TOP_P):
        for schedule in ("fixed", "linear_reverse"):
            kw = dict(k=k) if schedule == "fixed" else dict(
                k=None, schedule=schedule, k_min=k_min, k_max=k_max)
            name = ("ec" if core is None else "ec-core") + ("" if schedule == "fixed" else "-lr")
            pols = [RoutingPolicy.expert_choice(**kw, coreset_top_p=core, guard=None if core is None
                                                else scaled_guard(config.num_experts, g))
                    for g in (12, 16)]
            out.append((name, *pols))
    return out


def declare(config, policy: RoutingPolicy) -> None:
    """Config keys that make RoutingPolicy.from_config return `policy` (docs/routing.md)."""
    config.expert_choice_schedule = policy.schedule
    config.expert_choice_k_min, config.expert_choice_k_max = policy.k_min, policy.k_max
    if policy.kind == "ec_coreset":
        config.core_threshold = policy.top_p
    assert RoutingPolicy.from_config(config) == policy, (RoutingPolicy.from_config(config), policy)


def evaluate(model, problems, policy, dtype, batch):
    """One table row's numbers for `model` under `policy`."""
    start = time.perf_counter()
    answers, stats, path = training.solve_under(model, problems, policy, dtype, batch)
    c = model.config
    pairs = tasks.mean_stat(stats, "routed_pairs")
    return dict(policy=str(policy), accuracy=tasks.accuracy(answers, problems),
                unique_experts=tasks.mean_unique_experts(stats),
                max_load=tasks.mean_stat(stats, "max_expert_load"), pairs=pairs,
                gflops=pairs * 6 * c.hidden_size * c.moe_intermediate_size / 1e9,
                seconds=time.perf_counter() - start, path=path)


def set_trainable(model, experts: bool) -> None:
    """Only the router (gate weights), or the router and the experts (routed and shared)."""
    for name, p in model.named_parameters():
        p.requires_grad = ".mlp.gate." in name or (experts and ".mlp." in name
                                                    and ".mlp.gate." not in name
                                                    and "experts" in name)


def retrofit(token_model, policies, data, args, evaluate_row):
    """Fine-tune a copy of token_model under the training policy: the router stage, then the
    router + experts stage. Returns (rows, log, model)."""
    name, train_policy, eval_policy = policies
    model = copy.deepcopy(token_model)
    rows, log = [], {}
    if not args.smoke:
        rows.append((f"{name}, no fine-tune", evaluate_row(model, eval_policy)))
    for stage, experts, seconds, steps, lr in (
            ("router", False, args.router_seconds, args.router_steps, args.router_lr),
            ("router+experts", True, args.full_seconds, args.full_steps, args.full_lr)):
        set_trainable(model, experts)
        log[stage] = training.train_stage(
            model, *data, train_policy, steps=steps, seconds=seconds, lr=lr,
            batch_size=args.batch, desc=f"{name} ({stage})", log_every=50)
        log[stage].pop("losses")
        rows.append((f"{name}, {stage} ({log[stage]['steps']} steps)",
                     evaluate_row(model, eval_policy)))
        print(f"  {rows[-1][0]}: {_line(rows[-1][1])}", flush=True)
    for p in model.parameters():
        p.requires_grad = True
    return rows, log, model


def _line(r) -> str:
    return (f"acc {100 * r['accuracy']:.2f}%  unique {r['unique_experts']:.2f}  max load "
            f"{r['max_load']:.2f}  pairs {r['pairs']:.1f}  ({r['seconds']:.1f} s, {r['path']})")


def frontier_verdict(rows) -> str:
    """Which expert-choice rows are on the frontier against dMoE's row (issue 15: no worse
    accuracy at as few or fewer unique experts per block), as one line of the report."""
    dmoe = next((r for label, r in rows if label.startswith("arith-dmoe")), None)
    if dmoe is None:
        return "Frontier: no dMoE row to compare with."
    on = [label for label, r in rows if not label.startswith("arith-")
          and r["accuracy"] >= dmoe["accuracy"] and r["unique_experts"] <= dmoe["unique_experts"]]
    against = (f"dMoE p=0.6's {100 * dmoe['accuracy']:.2f}% at {dmoe['unique_experts']:.2f} "
               "unique experts per block")
    if on:
        return f"Frontier: on it against {against}: " + "; ".join(on) + "."
    return (f"Frontier: **no expert-choice row is on it**: none reaches {against} with as few "
            "or fewer experts (a negative result).")


def write_table(rows, meta, path) -> None:
    lines = ["# Expert-choice retrofit of the tiny arithmetic model (issue 15)", "",
             f"Test split: {meta['n_test']} held-out problems, exact match. Device: "
             f"{meta['device']} ({meta['dtype']}). E = {meta['E']} experts, top-{meta['k']}, "
             f"block 32; expert FLOPs = routed token-expert pairs x 6 x H x I (H = {meta['H']}, "
             f"I = {meta['I']}). Fine-tune from models/arith-token at batch {meta['batch']}: "
             "router only, then router + experts (steps in the label). All numbers per 32-token block, averaged over MoE layers, denoising "
             "forwards and problems; *max load* = the most rows one expert processes.", "",
             "| model, policy | accuracy | unique experts | max load | pairs | expert GFLOPs |",
             "|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {100 * r['accuracy']:.2f}% | {r['unique_experts']:.2f} | "
                     f"{r['max_load']:.2f} | {r['pairs']:.1f} | {r['gflops']:.4f} |")
    lines += ["", frontier_verdict(rows), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="models", help="folder holding arith-token/, arith-dmoe/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=200_000, help="training problems drawn")
    ap.add_argument("--test", type=int, default=2000, help="held-out test problems decoded")
    ap.add_argument("--batch", type=int, default=512, help="training batch")
    ap.add_argument("--eval-batch", type=int, default=1000)
    # Sized for an H200 (~40 ms a step at batch 512): 4 variants x 30 s of training.
    ap.add_argument("--router-steps", type=int, default=2000)
    ap.add_argument("--router-seconds", type=float, default=10.0)
    ap.add_argument("--router-lr", type=float, default=1e-3)
    ap.add_argument("--full-steps", type=int, default=4000)
    ap.add_argument("--full-seconds", type=float, default=20.0)
    ap.add_argument("--full-lr", type=float, default=5e-4)
    ap.add_argument("--lr-range", type=int, nargs=2, default=None, metavar=("K_MIN", "K_MAX"),
                    help="linear_reverse's k at an all-masked / unmasked window (default "
                         "top_k / 4 and 5 top_k / 4)")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default all)")
    ap.add_argument("--smoke", action="store_true", help="no before-fine-tune rows")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    load = lambda name: LLaDA2MoeModelLM.from_pretrained(  # noqa: E731
        os.path.join(args.models, name), dtype=torch.float32).to(device)
    token_model, dmoe_model = load("arith-token"), load("arith-dmoe")
    config = token_model.config
    problems = tasks.sample_problems("test", args.test, args.seed)
    stream = tasks.problem_stream("train", args.seed + 1)
    tokens, prompt_len = training.encode_problems([next(stream) for _ in range(args.pool)])
    data = (tokens.to(device), prompt_len.to(device))
    row = lambda model, policy: evaluate(model, problems, policy, dtype, args.eval_batch)  # noqa: E731
    rows = [("arith-token, token", row(token_model, RoutingPolicy.token())),
            ("arith-dmoe, dMoE p=0.6", row(dmoe_model, training.eval_policy(config)))]
    for label, r in rows:
        print(f"  {label}: {_line(r)}", flush=True)
    logs = {}
    for policies in variants(config, args.lr_range):
        if args.only and policies[0] not in args.only:
            continue
        got, logs[policies[0]], model = retrofit(token_model, policies, data, args, row)
        rows += got
        declare(model.config, policies[2])
        training.save_checkpoint(model, os.path.join(args.out, "models", f"arith-{policies[0]}"))
    meta = dict(n_test=len(problems), device=torch.cuda.get_device_name(device)
                if device.type == "cuda" else "CPU", dtype=str(dtype).replace("torch.", ""),
                E=config.num_experts, k=config.num_experts_per_tok, H=config.hidden_size,
                I=config.moe_intermediate_size, batch=args.batch,
                seconds=time.perf_counter() - start)
    os.makedirs(args.out, exist_ok=True)
    write_table(rows, meta, os.path.join(args.out, "ec.md"))
    with open(os.path.join(args.out, "ec.json"), "w") as f:
        json.dump(dict(meta=meta, rows=[dict(label=l, **r) for l, r in rows], train=logs), f,
                  indent=1)
    print(open(os.path.join(args.out, "ec.md")).read())
    return rows


if __name__ == "__main__":
    main()
