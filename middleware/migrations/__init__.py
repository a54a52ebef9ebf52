"""Alembic's scripts for the store's tables: env.py, script.py.mako and versions/ (one file per change).

The machinery that runs them (start-up policy, `switchboard migrate`) is middleware/migrate.py.
"""
