"""Runs one inference worker: ``python -m services.inference_worker``."""

from services.inference_worker.app import InferenceWorker
from services.inference_worker.config import WorkerConfig
from shared.config import from_env
from shared.lifecycle import main

if __name__ == "__main__":
    main(lambda: InferenceWorker(from_env(WorkerConfig)), "inference-worker")
