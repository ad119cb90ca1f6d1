"""The bearer token shared by `serve --token-file` and the agents' `--fleet-token-file`."""

from __future__ import annotations

from pathlib import Path


def read_token(path: str, what: str = "--token-file") -> str:
    """The bearer token in `path` (surrounding whitespace removed). Raises ValueError with a
    message that names the file, never its content."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path}: cannot read ({exc})") from None
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f"{what} {path}: must hold one token, without spaces")
    return token
