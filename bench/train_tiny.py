"""Train the tiny arithmetic LLaDA2 MoE of issue 6 in two stages and save both checkpoints.

    python bench/train_tiny.py                      # the shipped model (GPU: 5 min of training)
    python bench/train_tiny.py --size micro --out /tmp/m --stage1-steps 30 --stage2-steps 10
    bash bench/train_and_eval.sh OUT                # train, evaluate, pack (the GPU run)

Each stage stops at its step count or its time cap (--stage1-seconds 210, --stage2-seconds 90),
whichever comes first: the step time is measured over steps 10-40 and the cosine schedule is
shortened to fit the cap, so a slower machine trains fewer steps but never overruns.

The training itself (objective, routing in training, guards) is dmoe_triton/training.py.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from dmoe_triton import RoutingPolicy, tasks
from dmoe_triton.models import LLaDA2MoeModelLM
from dmoe_triton.training import (SIZES, encode_problems, eval_policy, model_config,
                                  save_checkpoint, train_policy, train_stage, validate)


def plot_losses(stages, path: str, smooth: int = 50) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for name, record in stages:
        y = torch.tensor(record["losses"])
        k = max(1, min(smooth, len(y) // 5))
        if len(y) >= k:
            y = torch.nn.functional.avg_pool1d(y[None, None], k, 1)[0, 0]
        x = torch.arange(len(y)) + offset + k - 1
        ax.plot(x.numpy(), y.numpy(), label=f"{name} ({record['policy']})")
        offset += len(record["losses"])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"masked-token cross-entropy (mean of {smooth} steps)")
    ax.set_title("Tiny arithmetic LLaDA2 MoE: token routing, then dMoE fine-tune")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=tuple(SIZES))
    ap.add_argument("--out", default="models", help="folder for arith-token/ and arith-dmoe/")
    ap.add_argument("--results", default="bench/results", help="folder for the curve and log")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=1_000_000,
                    help="training problems drawn (with repeats: about 260k distinct)")
    ap.add_argument("--val", type=int, default=512, help="validation problems decoded")
    ap.add_argument("--batch", type=int, default=512)
    # Step counts are upper bounds sized for an H100 (~15 ms a step at batch 512, estimated:
    # the step is bound by launch overhead); the time caps are what normally ends a stage.
    ap.add_argument("--stage1-steps", type=int, default=20_000)
    ap.add_argument("--stage1-seconds", type=float, default=210.0)
    ap.add_argument("--stage1-lr", type=float, default=2e-3)
    ap.add_argument("--stage2-steps", type=int, default=8_000)
    ap.add_argument("--stage2-seconds", type=float, default=90.0)
    ap.add_argument("--stage2-lr", type=float, default=5e-4)
    ap.add_argument("--balance-rate", type=float, default=1e-3)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    config = model_config(args.size)
    model = LLaDA2MoeModelLM(config).to(device)
    eval_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.size}, {n_params / 1e6:.2f} M parameters, device {device}", flush=True)

    t0 = time.perf_counter()
    stream = tasks.problem_stream("train", args.seed)
    tokens, prompt_len = encode_problems([next(stream) for _ in range(args.pool)])
    tokens, prompt_len = tokens.to(device), prompt_len.to(device)
    val = tasks.sample_problems("validation", args.val, args.seed)
    print(f"data: {args.pool} training draws, {args.val} validation problems "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    log = dict(size=args.size, parameters=n_params, config=SIZES[args.size], seed=args.seed)
    token = RoutingPolicy.token()
    log["stage1"] = train_stage(
        model, tokens, prompt_len, token, steps=args.stage1_steps, seconds=args.stage1_seconds,
        lr=args.stage1_lr, batch_size=args.batch, balance_rate=args.balance_rate,
        desc="stage 1 (token)", generator=generator)
    save_checkpoint(model, os.path.join(args.out, "arith-token"))
    acc, uniq, path = validate(model, val, token, eval_dtype)
    log["stage1"].update(val_accuracy=acc, val_unique_experts=uniq, val_path=path)
    print(f"stage 1: {log['stage1']['steps']} steps in {log['stage1']['seconds']:.0f} s, "
          f"val accuracy {acc:.4f} (token routing, {uniq:.1f} unique experts/block)", flush=True)

    log["stage2"] = train_stage(
        model, tokens, prompt_len, train_policy(config), steps=args.stage2_steps,
        seconds=args.stage2_seconds, lr=args.stage2_lr, batch_size=args.batch,
        desc="stage 2 (dmoe)", generator=generator)
    # The checkpoint declares the routing it was fine-tuned for (RoutingPolicy.from_config:
    # dMoE at this top_p, guard scaled to the experts), so --policy auto and patch_model run it.
    model.config.core_threshold = eval_policy(config).top_p
    save_checkpoint(model, os.path.join(args.out, "arith-dmoe"))
    acc, uniq, path = validate(model, val, eval_policy(config), eval_dtype)
    log["stage2"].update(val_accuracy=acc, val_unique_experts=uniq, val_path=path,
                         eval_policy=str(eval_policy(config)))
    print(f"stage 2: {log['stage2']['steps']} steps in {log['stage2']['seconds']:.0f} s, "
          f"val accuracy {acc:.4f} ({eval_policy(config)}, {uniq:.1f} unique experts/block)",
          flush=True)

    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "train_log.json"), "w") as f:  # before the plot
        json.dump({**log, **{s: {**log[s], "losses": [round(v, 5) for v in log[s]["losses"]]}
                             for s in ("stage1", "stage2")}}, f)
    plot_losses([("stage 1", log["stage1"]), ("stage 2", log["stage2"])],
                os.path.join(args.results, "loss_curve.png"))
    return log


if __name__ == "__main__":
    main()
