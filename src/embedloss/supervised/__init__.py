"""supervised losses."""

__all__: list[str] = []
