"""Orchestration: the Prefect flow that chains the stages, and the runners that start them."""
