"""`med3dvlm data ...`: reading, inspecting and preparing volumes and datasets."""

from __future__ import annotations

import typer

from . import app

data_app = typer.Typer(help="Read, inspect and prepare CT volumes and the M3D datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
