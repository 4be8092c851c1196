"""Self-distillation and clustering losses (teacher–student: DINO, iBOT, SwAV, KoLeo)."""

__all__: list[str] = []
