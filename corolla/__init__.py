"""corolla's distribution name as a package: `corolla.__version__` and `python -m corolla`. The code lives in
`protos/` (what both sides share), `peer/` (the server) and `client/` (the library); nothing is re-exported
here."""

from __future__ import annotations

from protos.cli import corolla_version

__version__ = corolla_version()  # the installed distribution's metadata; "0+unknown" if never installed
