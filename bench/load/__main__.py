"""`python -m bench.load ...` is `kvrelay bench ...`."""

from bench.load.cli import main

raise SystemExit(main())
