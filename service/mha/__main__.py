"""`python -m mha` = the `mha` command."""

from mha.cli import main

raise SystemExit(main())
