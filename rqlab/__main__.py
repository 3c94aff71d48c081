"""`python -m rqlab ...`: the same as the `rqlab` command."""
import sys

from rqlab.cli import main

sys.exit(main())
