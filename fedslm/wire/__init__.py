"""The message contract both sides speak: records <-> tensors, error categories, SecAgg+ masks."""
