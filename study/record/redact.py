"""Passwords out of what the study prints and records.

A lab's URLs carry credentials: ``--optuna-storage postgresql://optuna:PASSWORD@db:5432/optuna``,
a tracking URI with ``user:password@``, a libpq ``?password=`` or an object store's
``?secret_key=``. The driver prints these URLs, records them (environment.json, including the
command line) and puts them in error messages; each of those goes through ``mask_url`` first,
which replaces the secret with ``***``, as SQLAlchemy does when it shows a URL. User names, hosts,
ports and databases stay visible: they say which store was used, the password says nothing more.

It works on any text, not only a bare URL, so that an argument such as
``--optuna-storage=postgresql://u:p@h/db`` or a message quoting a URL is masked as a whole.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@  (SQLAlchemy allows any character but '@' in the password, '/' included)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@?#]*:)(?P<secret>[^\s@]*)(?=@)")
# ?password=... &secret_key=... : libpq, MySQL drivers and object-store URIs take secrets as parameters
_SECRET_PARAMS = ("password", "passwd", "pwd", "sslpassword", "secret", "secret_key", "secret_access_key",
                  "aws_secret_access_key", "session_token", "token", "access_token", "auth_token", "api_key")
_QUERY = re.compile(r"(?P<head>[?&;](?:" + "|".join(_SECRET_PARAMS) + r")=)(?P<secret>[^&;#\s]*)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` (or any text quoting URLs) with every password and secret parameter replaced by ``***``."""
    masked = _USERINFO.sub(lambda m: m["head"] + (MASK if m["secret"] else ""), url)
    return _QUERY.sub(lambda m: m["head"] + (MASK if m["secret"] else ""), masked)
