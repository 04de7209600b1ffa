"""What the launcher and the trainer share about a job, in pure Python (no torch).

- ``ds_config``: the DeepSpeed config of a plan (the launcher writes it, the trainer uses it);
- ``paths``: where a plan's relative paths point;
- ``data_files``: which data files a plan names, and the checks they must pass;
- ``errors``: ``TrainerInputError``, the one-line error for bad job input;
- ``constants``: values both sides must agree on.

Importing this package, or any of its modules, imports no torch, DeepSpeed or transformers.
"""
