"""Web surfaces: the admin API (and later the agent inbox and playground)."""
