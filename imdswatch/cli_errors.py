"""How every command refuses unusable input: one line on stderr, exit status 2."""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from imdswatch.config import Config, ConfigError, load_config


def fail(message: str) -> NoReturn:
    click.echo(f"imdswatch: {message}", err=True)
    sys.exit(2)


def config_or_exit(path: str | None) -> Config:
    """The configuration at `path` (the defaults without one); a bad file exits 2."""
    try:
        return load_config(path)
    except ConfigError as exc:
        fail(str(exc))
