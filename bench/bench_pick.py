"""The greedy pick of a denoising step (kernels/greedy_pick.py) against the torch pick it
replaced (upcast the bf16 logits, softmax, argmax, gather), at 1, 16 and 64 sequences of 32
rows of LLaDA2's 157184 logits. us per call: a CUDA graph of 10 calls (common.graph_ms), each
call on the next of enough logits buffers that the 50 MB L2 holds none (in decoding the pick
reads logits the lm_head just wrote, which may still sit in L2: this is the slower case);
floor = the bf16 logits' bytes (read once) / the copy bandwidth measured in the same process.

    python bench/bench_pick.py [--out FILE]     # H200: the table (markdown) to FILE too
    python bench/bench_pick.py --smoke          # CPU: both picks agree, no timing
"""
import argparse
import os
import sys

if "--smoke" in sys.argv:  # before any @triton.jit is created
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from common import capture, copy_bandwidth, graph_ms  # noqa: E402
from dmoe_triton.pick import greedy_pick  # noqa: E402

VOCAB, ROWS, REPS = 157184, 32, 10


def torch_pick(logits):
    """The pick before the kernel (decoding.pick_tokens at temperature 0, tenth session)."""
    probs = logits.float().softmax(-1)
    tok = probs.argmax(-1)
    return tok, probs.gather(-1, tok[..., None]).squeeze(-1)


L2_BYTES = 50 << 20


def graphed_us(fn, logits, device) -> float:
    """us per call of fn over REPS calls in one graph, cycling through copies of logits that
    add up to at least twice the L2."""
    copies = [logits] + [logits.clone() for _ in range(
        min(REPS, -(-2 * L2_BYTES // (logits.numel() * logits.element_size()))) - 1)]
    graph = capture(lambda: [fn(copies[i % len(copies)]) for i in range(REPS)], reps=1,
                    warmup=2)
    return graph_ms(graph, REPS, trials=20) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    vocab = 1000 if args.smoke else VOCAB
    bw = copy_bandwidth(device)
    lines = ["| sequences | torch pick us | greedy_pick us | floor us | % of copy bw | speed-up |",
             "|---|---|---|---|---|---|"]
    for seqs in (1, 16, 64):
        g = torch.Generator(device=device).manual_seed(seqs)
        logits = (torch.randn(seqs, ROWS, vocab, device=device, generator=g) * 4).to(
            torch.bfloat16)
        tok, _ = greedy_pick(logits, backend="triton")
        if not torch.equal(tok, torch_pick(logits)[0]):
            raise SystemExit(f"greedy_pick's tokens differ from torch's at {seqs} sequences")
        if args.smoke:
            continue
        ours, theirs = graphed_us(greedy_pick, logits, device), graphed_us(torch_pick, logits,
                                                                             device)
        floor = logits.numel() * logits.element_size() / bw * 1e6
        lines.append(f"| {seqs} | {theirs:.1f} | {ours:.1f} | {floor:.1f} | "
                     f"{100 * floor / ours:.0f}% | {theirs / ours:.2f}x |")
    name = "CPU smoke" if args.smoke else torch.cuda.get_device_name()
    text = "\n".join([f"# Greedy pick, {ROWS} rows x {vocab} bf16 logits per sequence ({name})",
                      "", ("No timing (CPU smoke)." if args.smoke else
                           f"Copy bandwidth {bw / 1e12:.3f} TB/s. `python bench/bench_pick.py`."),
                      ""] + lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
