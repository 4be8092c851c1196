"""embedloss inside the trainers people already use.

Each submodule imports its trainer library when it is imported (``import embedloss`` never
does); without it the import fails with one line saying what to install:
``pip install 'embedloss[integrations]'``.

=======================================================  ==========================================
module                                                   gives
=======================================================  ==========================================
:mod:`embedloss.integrations.transformers`               :class:`EmbedlossCallback` for any
                                                         ``transformers.Trainer``: the loss's
                                                         schedules, a momentum teacher, its terms
                                                         in the logs, its state in checkpoints
:mod:`embedloss.integrations.sentence_transformers`      :class:`EmbedlossLoss`: any embedloss loss
                                                         as a sentence-transformers loss (and
                                                         ``ST_LOSSES``, ST's loss names mapped)
=======================================================  ==========================================

PyTorch Lightning needs no helper: ``examples/lightning_simclr.py`` is a complete
``LightningModule`` (docs/integrations.md has the recipes).
"""

__all__: list[str] = []
