"""``python -m embedloss``: the command line (see :mod:`embedloss.cli`)."""

from embedloss.cli.main import main

raise SystemExit(main())
