"""`python -m lorakit ...` (and `torchrun -m lorakit train ...`): the `lorakit` command-line entry point."""

import sys

from .cli.main import main

sys.exit(main())
