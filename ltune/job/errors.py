"""The user-facing error of a training job's input (pure Python)."""


class TrainerInputError(ValueError):
    """Bad input to a training job (data, tokenizer, run folder): one line.

    The trainer exits 2 with it; the launcher raises it again as a LaunchError.
    """
