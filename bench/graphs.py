"""Moved to bench/common.py. Kept only for bench_routing.py, bench_moe.py and bench_attention.py,
which import it until they switch to `from common import ...` (then delete this file)."""
from common import capture, copy_bandwidth  # noqa: F401
