"""AI engines and human handoff, one module each, behind one small interface (see docs/connectors.md)."""
