"""Constants of a training job that more than one module relies on (pure Python)."""

# The label of a token that carries no loss: the default ``ignore_index`` of
# torch.nn.functional.cross_entropy (and transformers' loss functions).
IGNORE_INDEX = -100
