"""The fedslm command line (typer + rich)."""
