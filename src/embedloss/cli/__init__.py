"""The ``embedloss`` command line, and the Python way back into its runs.

``embedloss train --output DIR`` writes a run; :func:`load_encoder` gives its trained encoder::

    from embedloss.cli import load_encoder
    encoder = load_encoder("runs/demo")  # nn.Module: raw samples (N, *shape) -> embeddings (N, D)
"""

from embedloss.cli.use import Run, load_encoder, load_run

__all__ = ["Run", "load_encoder", "load_run"]
