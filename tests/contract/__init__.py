"""Contract tests of the event-log backends (``dispatch.log``), against real backends.

``MS`` is the one time unit of these tests: every timeout is a multiple of it, so a slow machine
scales them all with ``DISPATCH_TEST_TIMEOUT_FACTOR`` (websockets' ``tests/utils.py`` idea).
"""

from __future__ import annotations

import os

MS = 0.001 * float(os.environ.get("DISPATCH_TEST_TIMEOUT_FACTOR", "1"))
