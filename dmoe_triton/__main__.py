"""`python -m dmoe_triton ...` is the `dmoe` command."""
from .cli import main

raise SystemExit(main())
