"""Training: the margin-softmax head, schedules, checkpoints and the loop.

The entry point is ``speakerlab train`` (:mod:`speakerlab.bin.train`), configured with Hydra from
the top-level ``conf/`` tree; :func:`speakerlab.training.trainer.train` runs one experiment.

Modules: :mod:`.builders` (configuration to objects), :mod:`.batching` (the global batch over
processes and accumulation steps), :mod:`.setup` (a run built, resumed or initialised),
:mod:`.checkpointing` (what a checkpoint holds; writing, pruning, resume checks),
:mod:`.finetune` (``trainer.init_from``), :mod:`.trainer` (the loop), :mod:`.stats` (running
statistics on the device), :mod:`.nonfinite` (non-finite losses), :mod:`.schedules`,
:mod:`.losses`, :mod:`.progress` (logs, TensorBoard, progress bars).
"""
