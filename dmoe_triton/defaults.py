"""The paper's routing sizes, given for E = 256 experts, scaled to a model's expert count: the
one place the CLI, training and the benchmarks take their default guard and coreset size from."""
from __future__ import annotations


def scaled_guard(num_experts: int, at_256: int = 16) -> int:
    """A dMoE guard given for E = 256 (16 in evaluation, 12 in training) scaled to
    `num_experts`, at least 1."""
    return max(1, round(at_256 * num_experts / 256))


def scaled_size(num_experts: int) -> int:
    """DES's coreset size, 15% of the experts (38 at E = 256), at least 1."""
    return max(1, round(0.15 * num_experts))
