"""``python -m virtmig.client.cli``: the ``virtmig`` console script."""

from __future__ import annotations

import sys

from virtmig.client.cli.app import main

sys.exit(main())
