"""Pipeline stages. Each is `python -m stages.<name> --config FILE [key=value ...]` around a plain `run(ctx)`."""
