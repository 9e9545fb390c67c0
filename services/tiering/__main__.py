"""Runs the tiering service: ``python -m services.tiering``."""

from services.tiering.app import Tiering
from services.tiering.config import TieringConfig
from shared.config import from_env
from shared.lifecycle import main

if __name__ == "__main__":
    main(lambda: Tiering(from_env(TieringConfig)), "tiering")
