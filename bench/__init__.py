"""Benchmarks: Switchboard against a bare Starlette endpoint measured in the same run (`python -m bench`)."""
