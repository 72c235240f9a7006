"""Runs: the run folder and what is made from it.

- ``folder``: the run folder, its one owner (file names, schema, claim and lock, status lifecycle);
- ``outputs``: how attnzoo writes files (atomic, never over a file it did not create);
- ``predict``: ``load_run`` (a run folder, ``local-dir:PATH``, ``hf-hub:org/name``) and ``Run.predict``;
- ``export``: ONNX and ``torch.export``, and the Hub face of an older run;
- ``hub``: the Hub face (``config.json`` in timm's shape, its schema) and runs taken by name; ``card``: the
  model card; ``push``: a finished run uploaded as a Hub model repo;
- ``sweep``: an Optuna study of modules x sites x seeds, and its leaderboard.
"""
