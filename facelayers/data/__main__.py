"""``python -m facelayers.data MANIFEST FORMAT [ROOT]``: validate a manifest (see :func:`validate_manifest`)."""

from __future__ import annotations

from .validate import main

raise SystemExit(main())
