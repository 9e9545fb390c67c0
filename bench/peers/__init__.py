"""Peers of the side-by-side benchmark (bench/compare.py): one module per system.

Every module here except ``mesh`` runs inside its own venv under ``.bench/venvs/`` (never the
project's ``.venv``), so none of them imports the project at module level.
"""
