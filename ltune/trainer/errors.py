"""The trainer's user-facing error (pure Python)."""


class TrainerInputError(ValueError):
    """Bad input to a training job (data, tokenizer, run folder): one line, exit code 2."""
