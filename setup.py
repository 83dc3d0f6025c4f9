"""Build the optional compiled search of the responder index (``dispatch.geo._speedups``).

Everything else about the package is in pyproject.toml. As in websockets, the extension is
optional: without a C compiler the build goes on and the pure-Python index is used. Set
``DISPATCH_REQUIRE_SPEEDUPS=1`` (``make`` does) to make a failed compile fail the install.
"""

import os

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dispatch.geo._speedups",
            sources=["dispatch/geo/_speedups.c"],
            # No fused multiply-add: distances must round exactly as Python's math does.
            extra_compile_args=["-O2", "-ffp-contract=off"],
            optional=not os.environ.get("DISPATCH_REQUIRE_SPEEDUPS"),
        )
    ]
)
