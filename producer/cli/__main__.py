"""``python -m producer.cli``: the `spillway` command."""

import os
import sys

from producer.cli import main

main(prog_name=os.path.basename(sys.argv[0]) or "spillway")
