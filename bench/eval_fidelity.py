"""What dMoE keeps: accuracy and unique experts per block of the tiny arithmetic model (issue 6).

    python bench/eval_fidelity.py                   # models/arith-{token,dmoe}, 5000 test problems
    python bench/eval_fidelity.py --fp8             # FP8 experts vs bf16 (issue 16)

Both checkpoints (before and after the dMoE fine-tune) decode the test split under token
routing, dMoE at p in {0.4, ..., 0.8} (guard 16/256 of E), DES-vote (the top 15% of E by votes,
as DES chose for LLaDA2.0-mini) and the Top-4 cap. Decoding is LLaDA2's block diffusion
(`dmoe_triton.generate()`: block 32, 32 steps, threshold 0.95, argmax) through the inference path
(`patch_model`: fused routing + MoE kernels on the GPU). Unique experts = distinct experts the
32 tokens of a block route to, averaged over MoE layers, denoising forwards and problems (the
paper's measure). Writes fidelity.md (table), fidelity.png (accuracy against unique experts)
and fidelity.json.

Before the table, on the GPU: the token-routed decode of one batch is timed with and without
the CUDA graph (`--cuda-graph auto` keeps the faster, after checking both give the same
answers), and the test size is cut, if needed, so that all decodes fit `--budget-seconds`.
After it, the patched path is checked against independent forwards on `--check` problems:
token routing against the model's own MoE (official gate, expert loop), dMoE p=0.6 against
the dense training forward (the one stage 2 trained through).

--fp8 (issue 16) instead decodes the same held-out problems with both checkpoints under token
routing and dMoE p=0.6 twice, with the routed and shared experts in the model's dtype and in FP8
e4m3 (128 x 128 block scales, quantized at load: `patch_model(..., expert_dtype="fp8")`), and writes
fidelity_fp8.md / .json: accuracy of each, the difference in points (target: within 1), and the
share of identical answers.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from dmoe_triton import RoutingPolicy, tasks
from dmoe_triton import training  # the same eval policy, guard and decode helper as training
from dmoe_triton.defaults import scaled_guard
from dmoe_triton.models import LLaDA2MoeModelLM
from dmoe_triton.patch import patch_model

TOP_P = (0.4, 0.5, 0.6, 0.7, 0.8)
CHECKPOINTS = (("before", "arith-token"), ("after", "arith-dmoe"))


def policies(config):
    """(label, policy) in table order."""
    E = config.num_experts
    des = max(1, round(0.15 * E))
    out = [("token", RoutingPolicy.token())]
    out += [(f"dMoE p={p}", training.eval_policy(config, p)) for p in TOP_P]
    out += [(f"DES-vote {des}", RoutingPolicy.des_vote(des)), ("Top-4 cap", RoutingPolicy.topk_cap(4))]
    return out


def load(directory, device, dtype):
    """(the checkpoint in `dtype` on `device`, a patched copy of it)."""
    model = LLaDA2MoeModelLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    return model, patch_model(copy.deepcopy(model), RoutingPolicy.token())


def _timed_solve(model, patched, problems, policy, dtype, batch_size, cuda_graph):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    answers, stats, path = training.solve_under(model, problems, policy, dtype, batch_size,
                                                  patched=patched, cuda_graph=cuda_graph)
    return answers, stats, path, time.perf_counter() - start


def calibrate(model, patched, problems, dtype, batch_size, mode):
    """Warm the kernels up, then time one batch under token routing with and without the CUDA
    graph (on CUDA, mode "auto"). Returns (cuda_graph choice, seconds per problem, notes)."""
    batch = problems[:batch_size]
    token = RoutingPolicy.token()
    _timed_solve(model, patched, batch[:64], token, dtype, batch_size, False)  # compile
    on_cuda = next(model.parameters()).is_cuda
    modes = {"on": [True], "off": [False], "auto": [True, False] if on_cuda else [False]}[mode]
    runs = {}
    for graph in modes:
        _timed_solve(model, patched, batch[:64], token, dtype, batch_size, graph)  # capture once
        answers, _, path, seconds = _timed_solve(model, patched, batch, token, dtype, batch_size,
                                                 graph)
        runs[graph] = (answers, seconds, path)
        print(f"  calibration: {len(batch)} problems, cuda_graph={graph}: {seconds:.2f} s "
              f"[{path}]", flush=True)
    choice = min(runs, key=lambda g: runs[g][1])
    notes = dict(cuda_graph=choice, batch=len(batch),
                 seconds={str(g): round(r[1], 3) for g, r in runs.items()})
    if len(runs) == 2:
        notes["graph_answers_equal"] = runs[True][0] == runs[False][0]
        if not notes["graph_answers_equal"]:
            print("!! the CUDA graph changes answers: decoding without it", flush=True)
            choice = notes["cuda_graph"] = False
    return choice, runs[choice][1] / len(batch), notes


def evaluate_checkpoint(model, patched, problems, dtype, batch_size, cuda_graph):
    """One row per policy: accuracy (overall and per task), unique experts, coreset size."""
    rows = []
    for label, policy in policies(model.config):
        answers, stats, path, seconds = _timed_solve(model, patched, problems, policy, dtype,
                                                     batch_size, cuda_graph)
        right = [tasks.exact_match(a, p.answer) for a, p in zip(answers, problems)]
        by_task = {t: sum(r for r, p in zip(right, problems) if p.task == t)
                   / max(1, sum(p.task == t for p in problems)) for t in tasks.TASKS}
        coreset = [s.mean_coreset_size for s in stats if s.mean_coreset_size is not None]
        rows.append(dict(
            policy=label, spec=str(policy), accuracy=sum(right) / len(problems), by_task=by_task,
            unique_experts=tasks.mean_unique_experts(stats),
            coreset=sum(coreset) / len(coreset) if coreset else None,
            outside_coreset=sum(s.outside_coreset or 0 for s in stats),
            forwards=sum(s.forwards for s in stats), seconds=seconds, path=path,
            answers=answers))
        r = rows[-1]
        print(f"  {label:14s} acc {r['accuracy']:.4f}  unique {r['unique_experts']:6.2f}  "
              f"forwards {r['forwards']:4d}  {r['seconds']:5.1f} s  [{path}]", flush=True)
    return rows


def check_paths(model, rows, problems, dtype, batch_size):
    """Answers of the patched path against independent forwards on `problems` (the first ones
    of the test split): token routing against the model's own MoE (official gate + expert
    loop), dMoE p=0.6 against the dense training forward. Returns a list of dicts."""
    out = []
    by_label = {r["policy"]: r for r in rows}
    p06 = training.eval_policy(model.config, 0.6)
    for label, policy, name in (("token", RoutingPolicy.token(), "model's own MoE"),
                                ("dMoE p=0.6", p06, "dense training forward")):
        start = time.perf_counter()
        with torch.no_grad():
            if policy.kind == "token":
                answers, _ = tasks.solve(model, problems, batch_size, cuda_graph=False)
            else:
                with training.dense_training_routing(model, policy):
                    answers, _ = tasks.solve(model, problems, batch_size, cuda_graph=False)
        patched = by_label[label]["answers"][:len(problems)]
        same = sum(a == b for a, b in zip(answers, patched)) / max(1, len(problems))
        out.append(dict(policy=label, against=name, problems=len(problems), same_answers=same,
                        accuracy_patched=tasks.accuracy(patched, problems),
                        accuracy_other=tasks.accuracy(answers, problems)))
        print(f"  check {label}: patched path vs {name}: {100 * same:.1f}% same answers on "
              f"{len(problems)} problems ({time.perf_counter() - start:.1f} s)", flush=True)
    return out


def evaluate_fp8(model, patched, problems, dtype, batch_size, cuda_graph=False):
    """Rows (policy, accuracy in the model's dtype, in FP8, points lost, same answers) for token
    routing and dMoE p=0.6, the FP8 copy quantized from `patched`."""
    fp8 = patch_model(copy.deepcopy(patched), RoutingPolicy.token(), expert_dtype="fp8")
    rows = []
    for label, policy in (("token", RoutingPolicy.token()),
                          ("dMoE p=0.6", training.eval_policy(model.config, 0.6))):
        got = {}
        for kind, run in (("base", patched), ("fp8", fp8)):
            answers, stats, _, _ = _timed_solve(model, run, problems, policy, dtype, batch_size,
                                                cuda_graph)
            got[kind] = (answers, tasks.accuracy(answers, problems),
                         tasks.mean_unique_experts(stats))
        same = sum(a == b for a, b in zip(got["base"][0], got["fp8"][0])) / len(problems)
        rows.append(dict(policy=label, accuracy=got["base"][1], accuracy_fp8=got["fp8"][1],
                         points_lost=100 * (got["base"][1] - got["fp8"][1]), same_answers=same,
                         unique=got["base"][2], unique_fp8=got["fp8"][2]))
        r = rows[-1]
        print(f"  {label:11s} acc {r['accuracy']:.4f} fp8 {r['accuracy_fp8']:.4f} "
              f"({r['points_lost']:+.2f} points lost) same answers {100 * same:.1f}%", flush=True)
    return rows


def run_fp8(args, problems, loaded, dtype):
    lines = [f"# FP8 experts vs {str(dtype).replace('torch.', '')}: {len(problems)} held-out "
             f"problems (seed {args.seed})", "",
             "| checkpoint | policy | accuracy | accuracy FP8 | points lost | same answers | "
             "unique | unique FP8 |", "|---|---|---|---|---|---|---|---|"]
    results = {}
    for name, folder in CHECKPOINTS:
        print(f"{name} the fine-tune: {folder}", flush=True)
        results[name] = evaluate_fp8(*loaded[name], problems, dtype, args.batch,
                                     args.cuda_graph != "off" and torch.cuda.is_available())
        for r in results[name]:
            lines.append(f"| {folder} | {r['policy']} | {100 * r['accuracy']:.2f}% | "
                         f"{100 * r['accuracy_fp8']:.2f}% | {r['points_lost']:+.2f} | "
                         f"{100 * r['same_answers']:.1f}% | {r['unique']:.2f} | "
                         f"{r['unique_fp8']:.2f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fidelity_fp8.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "fidelity_fp8.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(lines))
    return results


def _pct(x, ref):
    return f"{100 * x / ref:.1f}%" if ref else "n/a"


def write_table(results, config, meta, path):
    before, after = results["before"], results["after"]
    E = config.num_experts
    lines = [
        "# Fidelity: what block routing keeps on the tiny arithmetic model",
        "",
        f"Test split: {meta['n_test']} held-out problems ({', '.join(tasks.TASKS)}), exact match of "
        "the final answer. Model: LLaDA2 layout, "
        f"{config.num_hidden_layers} layers (layer 0 dense), hidden {config.hidden_size}, "
        f"{E} experts top-{config.num_experts_per_tok} in {config.n_group} groups keep "
        f"{config.topk_group}, one shared expert, {meta['dtype']}. Decoding: block 32, 32 steps, threshold "
        f"0.95, argmax. Device: {meta['device']}. dMoE guard {scaled_guard(E, 16)} "
        f"(16/256 of E); the fine-tune ran at p = {training.TRAIN_TOP_P}, guard "
        f"{scaled_guard(E, 12)}.",
        "",
        "*before* = `models/arith-token` (trained with token routing); *after* = "
        "`models/arith-dmoe` (the same weights fine-tuned with dMoE routing in the forward). "
        "Unique experts = distinct experts routed by the 32 tokens of a block, averaged over MoE "
        "layers, denoising forwards and problems; *kept* and *experts* compare with token "
        "routing of the same checkpoint.",
        "",
        "| policy | before: accuracy | before: unique experts | after: accuracy | "
        "after: unique experts | after: kept | after: experts | after: coreset |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref_b, ref_a = before[0], after[0]
    for b, a in zip(before, after):
        core = f"{a['coreset']:.2f}" if a["coreset"] is not None else ""
        lines.append(
            f"| {a['policy']} | {100 * b['accuracy']:.2f}% | {b['unique_experts']:.2f} | "
            f"{100 * a['accuracy']:.2f}% | {a['unique_experts']:.2f} | "
            f"{_pct(a['accuracy'], ref_a['accuracy'])} | "
            f"{_pct(a['unique_experts'], ref_a['unique_experts'])} | {core} |")
    lines += ["", "Accuracy by task:", "",
              "| checkpoint, policy | " + " | ".join(tasks.TASKS) + " |",
              "|---|" + "---|" * len(tasks.TASKS)]
    for name, rows in (("before", before), ("after", after)):
        for r in rows:
            if r["policy"] in ("token", "dMoE p=0.6"):
                lines.append(f"| {name}, {r['policy']} | "
                             + " | ".join(f"{100 * r['by_task'][t]:.1f}%" for t in tasks.TASKS) + " |")
    paths = sorted({r["path"] for rows in (before, after) for r in rows})
    cal = meta["calibration"]
    timing = ", ".join(f"cuda_graph={g}: {t:.2f} s" for g, t in cal["seconds"].items())
    lines += ["", f"Decoding path: {', '.join(paths)}, batches of {meta['batch']}. Picks outside "
              f"the coreset: {sum(r['outside_coreset'] for rows in (before, after) for r in rows)}. "
              f"One batch of {cal['batch']} problems under token routing took {timing}"
              + (f" (same answers: {cal['graph_answers_equal']})"
                 if "graph_answers_equal" in cal else "") + ".",
              "", "Path checks (the patched inference path against independent forwards, same "
              "problems, same dtype):", "",
              "| checkpoint | policy | against | problems | same answers | accuracy: patched / "
              "other |", "|---|---|---|---|---|---|"]
    for name, checks in meta["checks"].items():
        for c in checks:
            lines.append(f"| {name} | {c['policy']} | {c['against']} | {c['problems']} | "
                         f"{100 * c['same_answers']:.1f}% | {100 * c['accuracy_patched']:.1f}% / "
                         f"{100 * c['accuracy_other']:.1f}% |")
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, marker in (("before", "o"), ("after", "s")):
        rows = results[name]
        x = [r["unique_experts"] for r in rows]
        y = [100 * r["accuracy"] for r in rows]
        ax.scatter(x, y, marker=marker, label=f"{name} the dMoE fine-tune")
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(r["policy"], (xi, yi), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("unique experts per 32-token block (mean over layers and forwards)")
    ax.set_ylabel("exact match on the test split (%)")
    ax.set_title("Tiny arithmetic LLaDA2 MoE: accuracy against experts touched")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="models", help="folder holding arith-token/, arith-dmoe/")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--test", type=int, default=5000, help="test problems (at most)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--budget-seconds", type=float, default=100.0,
                    help="time for the table's decodes; the test size is cut to fit")
    ap.add_argument("--check", type=int, default=256, help="problems for the path checks")
    ap.add_argument("--fp8", action="store_true",
                    help="FP8 experts vs the model's dtype, token and dMoE p=0.6 (fidelity_fp8.*)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    problems = tasks.sample_problems("test", args.test, args.seed)
    loaded = {name: load(os.path.join(args.models, folder), device, dtype)
              for name, folder in CHECKPOINTS}
    if args.fp8:
        return run_fp8(args, problems, loaded, dtype)
    model, patched = loaded["before"]
    cuda_graph, per_problem, calibration = calibrate(model, patched, problems, dtype,
                                                     args.batch, args.cuda_graph)
    runs = len(CHECKPOINTS) * len(policies(model.config))
    fits = int(args.budget_seconds / (runs * per_problem))
    keep = min(len(problems), max(fits, 200))  # 200 at least: an accuracy worth printing
    if keep < len(problems):
        print(f"  {len(problems)} problems would take {runs * per_problem * len(problems):.0f} s "
              f"over {runs} decodes: using the first {keep}", flush=True)
        problems = problems[:keep]
    results = {}
    for name, folder in CHECKPOINTS:
        print(f"{name} the fine-tune: {folder}", flush=True)
        model, patched = loaded[name]
        results[name] = evaluate_checkpoint(model, patched, problems, dtype, args.batch, cuda_graph)
    checks = {name: check_paths(loaded[name][0], results[name], problems[:args.check], dtype,
                                args.batch) for name, _ in CHECKPOINTS}
    config = model.config
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    meta = dict(n_test=len(problems), seed=args.seed, device=device_name, batch=args.batch,
                dtype=str(dtype).replace("torch.", ""),
                calibration=calibration, checks=checks)
    os.makedirs(args.out, exist_ok=True)
    write_table(results, config, meta, os.path.join(args.out, "fidelity.md"))
    with open(os.path.join(args.out, "fidelity.json"), "w") as f:
        rows = {k: [{c: v for c, v in r.items() if c != "answers"} for r in rs]
                for k, rs in results.items()}
        json.dump(dict(meta=meta, **rows), f, indent=1)
    plot(results, os.path.join(args.out, "fidelity.png"))
    a = results["after"]
    p06 = next(r for r in a if r["policy"] == "dMoE p=0.6")
    print(f"\nafter fine-tune: token {100 * a[0]['accuracy']:.2f}% at {a[0]['unique_experts']:.1f} "
          f"experts; dMoE p=0.6 {100 * p06['accuracy']:.2f}% at {p06['unique_experts']:.1f} "
          f"experts: kept {_pct(p06['accuracy'], a[0]['accuracy'])} of accuracy with "
          f"{_pct(p06['unique_experts'], a[0]['unique_experts'])} of the experts")
    return results


if __name__ == "__main__":
    main()
