"""Passwords stay out of logs and records: URLs are shown and recorded with their password masked."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/]*):(?P<password>[^@/]*)@")


def mask_url(url: str) -> str:
    """``postgresql://lab:***@db:5432/optuna`` for ``postgresql://lab:secret@db:5432/optuna``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url or "")
