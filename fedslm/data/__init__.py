"""Data: readers for a node's files, bundled real datasets, task formatting."""

from fedslm.data.examples import CausalExample, ClassificationExample, TaskData
from fedslm.data.load import load_task_data
from fedslm.data.tasks import Encoded, get_task

__all__ = ["CausalExample", "ClassificationExample", "Encoded", "TaskData", "get_task", "load_task_data"]
