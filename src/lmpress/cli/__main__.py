"""``python -m lmpress.cli``: the ``lmpress`` command, for environments without the script on PATH."""

from lmpress.cli import main

main()
