"""Runs one router process: ``python -m services.router``."""

from services.router.app import Router
from services.router.config import RouterConfig
from shared.config import from_env
from shared.lifecycle import main

if __name__ == "__main__":
    main(lambda: Router(from_env(RouterConfig)), "router")
