"""`python -m rqlab ...` (and `torchrun ... -m rqlab -- ...`): the command line."""
import sys

from rqlab.cli import main

# `rqlab train --nproc N` runs `torchrun ... -m rqlab -- ARGS`: the "--" keeps torchrun from
# reading rqlab's options (`--n` abbreviates several of its own); some Pythons pass it on.
sys.exit(main(sys.argv[2:] if sys.argv[1:2] == ["--"] else None))
