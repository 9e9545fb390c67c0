"""Runs one retrieval worker: ``python -m services.retrieval_worker``."""

from services.retrieval_worker.app import RetrievalWorker
from services.retrieval_worker.config import RetrievalConfig
from shared.config import from_env
from shared.lifecycle import main

if __name__ == "__main__":
    main(lambda: RetrievalWorker(from_env(RetrievalConfig)), "retrieval-worker")
