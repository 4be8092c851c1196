"""Text-embedding losses over scored sentence pairs (CoSENT, AnglE)."""

__all__: list[str] = []
