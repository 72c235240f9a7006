"""Training: a fastai ``Learner`` around the model, and ``fit``, a training run from settings to a run folder.

- ``settings``: ``FitConfig``, the one declaration of every fit setting (checked before torch is imported;
  the CLI's options, the Python API and the run's ``request`` come from it);
- ``data``: image folders (layouts, bad files, what is not data) and fastai ``DataLoaders``; ``demo``: the demo set;
- ``learner``: ``attention_learner``, shaped like ``vision_learner``;
- ``callbacks``: the run's lifecycle as fastai callbacks, one job each (status, checkpoints, NaN guard, signals,
  history, progress);
- ``checkpoints``: the checkpoint files (model, optimiser, random states) without pickle;
- ``distributed``: ``torchrun`` / ``accelerate launch``; ``ddp``: its fastai pieces (the trainer, sharded loaders,
  whole-set metrics); ``threads``: how many CPU threads torch uses;
- ``fit``: the orchestration.
"""
