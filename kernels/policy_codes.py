"""The integer code of each routing policy, as the kernels see it (a constexpr argument).

Defined once here, imported by kernels/routing.py (its branches) and by dmoe_triton/config.py
(the policy table, `PolicyKind.code`). No @triton.jit code in this file, so importing it never
creates a kernel (TRITON_INTERPRET may still be unset when dmoe_triton.config loads).
"""
import triton.language as tl

TOKEN = tl.constexpr(0)      # token, topk_cap: no coreset, route_kernel only
DMOE = tl.constexpr(1)       # block top-p coreset of summed votes, with a guard
DES_VOTE = tl.constexpr(2)   # block top-`size` coreset of summed votes
CAPACITY = tl.constexpr(3)   # LLaDA2.2: window top-`capacity` experts by max score, plain top-k
EXPERT_CHOICE = tl.constexpr(4)  # experts take their top-c rows (kernels/expert_choice.py)
