"""The planner: pure Python (no torch, deepspeed or transformers)."""
