"""Switchboard: bot orchestration middleware."""

__version__ = "0.1.0"
