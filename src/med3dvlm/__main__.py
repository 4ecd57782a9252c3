"""`python -m med3dvlm ...` runs the CLI, e.g. `accelerate launch -m med3dvlm train clip --config FILE`."""

from .cli import main

raise SystemExit(main())
