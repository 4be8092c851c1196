"""The ``embedloss`` command line."""
