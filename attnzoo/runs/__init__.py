"""Runs: the run folder and what is made from it.

- ``folder``: the run folder, its one owner (file names, schema, claim and lock, status lifecycle);
- ``outputs``: how attnzoo writes files (atomic, never over a file it did not create);
- ``predict``: ``load_run`` and ``Run.predict``;
- ``export``: ONNX and ``torch.export``;
- ``sweep``: an Optuna study of modules x sites x seeds, and its leaderboard.
"""
