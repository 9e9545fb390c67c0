"""Runs one batcher replica: ``python -m services.batcher``."""

from services.batcher.app import Batcher
from services.batcher.config import BatcherConfig
from shared.config import from_env
from shared.lifecycle import main

if __name__ == "__main__":
    main(lambda: Batcher(from_env(BatcherConfig)), "batcher")
