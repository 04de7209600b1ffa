r"""The environment DeepSpeed's runner carries to the other nodes of a ``--hostfile`` launch.

deepspeed/launcher/runner.py (0.19.8) starts the other nodes through pdsh (ssh) with a command
that exports only: the variables whose names start with EXPORT_ENVS (``MLFLOW``, ``PYTHON``,
``MV2``, ``UCX``) or the accelerator's prefixes (CUDA: ``NCCL``), and every ``KEY=VALUE`` line of
the file named by ``DS_ENV_FILE`` (default ``.deepspeed_env``) looked up in ``~`` and in the
current folder (``os.path.join(path, name)``: an absolute name is that one file). Anything else
ltune's job needs (LTUNE_CACHE_DIR, HF_HOME, TORCH_EXTENSIONS_DIR, OMP_NUM_THREADS, PATH for
ninja, ...) would not reach the other nodes.

So a ``--hostfile`` launch writes RUN_DIR/deepspeed.env and sets DS_ENV_FILE to its absolute
path. It holds, later lines winning: the variables of this environment that the job reads
(FORWARD_PREFIXES, FORWARD_NAMES), ltune's own job variables, then the lines of the user's own
``~/.deepspeed_env`` and ``./.deepspeed_env`` (DS_ENV_FILE replaces the name the runner looks
for, so they are carried over here instead of being dropped).

The runner reads each line as ``key, val = line.split('=', 1)`` (a blank line is an error) and
writes ``export KEY=VAL;`` into the remote shell command, VAL in double quotes when it holds a
character outside ``[\w@%+=:,./-]`` (multinode_runner.py ``add_export``), stripped of
surrounding whitespace. Inside double quotes the shell still expands ``$``, backquotes and
backslashes, so a value holding one of them, a control character, or surrounding whitespace
is left out (and named), never written.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

ENV_FILE = "deepspeed.env"
DS_ENV_FILE_VAR = "DS_ENV_FILE"
#: the name the runner looks for when DS_ENV_FILE is unset (runner.py DEEPSPEED_ENVIRONMENT_NAME)
DEFAULT_DS_ENV_NAME = ".deepspeed_env"
#: variables of the launching environment the job reads, by prefix
FORWARD_PREFIXES = (
    "LTUNE_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH_", "PYTORCH_", "NCCL_", "OMP_", "MKL_", "DS_", "TRITON_",
)
#: and by exact name (CUDA_VISIBLE_DEVICES is not one: every node has its own devices)
FORWARD_NAMES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "CUDA_HOME", "VIRTUAL_ENV")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_UNSAFE = re.compile(r"[\"$`\\\x00-\x1f\x7f]")


def forwarded(name: str) -> bool:
    """Whether the job needs this variable of the launching environment on every node."""
    return name != DS_ENV_FILE_VAR and (name in FORWARD_NAMES or name.startswith(FORWARD_PREFIXES))


def writable(name: str, value: str) -> bool:
    """Whether KEY=VALUE reaches the remote shell unchanged through the runner's quoting."""
    return bool(_NAME.match(name)) and not _UNSAFE.search(value) and value == value.strip()


def parse_env_lines(text: str) -> dict[str, str]:
    """KEY=VALUE lines as the runner reads them (blank lines and lines without '=' skipped)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def env_file(
    job_env: Mapping[str, str], environ: Mapping[str, str], user_files: Iterable[str] = ()
) -> tuple[str, list[str]]:
    """The deepspeed.env text, and the names left out because their values cannot be carried."""
    entries = {k: environ[k] for k in sorted(environ) if forwarded(k)}
    entries.update((k, v) for k, v in job_env.items() if k != DS_ENV_FILE_VAR)
    for text in user_files:
        entries.update(parse_env_lines(text))
    lines, skipped = [], []
    for key, value in entries.items():
        if writable(key, value):
            lines.append(f"{key}={value}")
        else:
            skipped.append(key)
    return "".join(line + "\n" for line in lines), skipped
