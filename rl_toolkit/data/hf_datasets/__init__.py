"""Built-in preference datasets; each exposes `formatted_ds` and `task_spec`."""

from rl_toolkit.data.hf_datasets.binary_preference import BinaryPreferenceDataset
from rl_toolkit.data.hf_datasets.dpo import DPODataset
from rl_toolkit.data.hf_datasets.helpsteer3 import HelpSteer3Dataset, format_helpsteer3

__all__ = ["BinaryPreferenceDataset", "DPODataset", "HelpSteer3Dataset", "format_helpsteer3"]
