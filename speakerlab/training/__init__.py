"""Training: distributed set-up, the margin-softmax head, schedules, checkpoints and the loop.

The entry point is ``speakerlab train`` (:mod:`speakerlab.bin.train`), configured with Hydra from
the top-level ``conf/`` tree; :func:`speakerlab.training.trainer.train` runs one experiment.
"""
