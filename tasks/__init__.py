"""Prefect tasks: thin, cached wrappers over sefe_core, one per pipeline step."""
