"""python -m crawler -> cli.main()."""

from __future__ import annotations

import sys

from crawler.cli import main

sys.exit(main())
