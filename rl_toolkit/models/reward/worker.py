"""The reward-model worker: one process, one shard of a frozen reward model (inference only).

A Hugging Face sequence-classification model with one label, sharded with FSDP2 like the policy
(rl_toolkit/models/fsdp/); a plain class, built standalone, under torchrun or in a Ray actor
(the ``RewardModel`` facade). Every public method is collective.
"""

import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from rl_toolkit.config_schema import MicroBatches, RewardModelConfig
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.fsdp.build import build_sharded_model
from rl_toolkit.models.fsdp.init import build_mesh, init_distributed
from rl_toolkit.models.role_config import check_gpu_options, fsdp_options, model_source
from rl_toolkit.models.value.model import ScalarHeadModel, inference_scores, scalar_head_config

_SECTION = "reward_model"


class RewardModelWorker:
    """One worker of a frozen reward model.

    Args:
        config: the `reward_model` section.
    """

    def __init__(self, *, config: RewardModelConfig) -> None:
        check_gpu_options(config, _SECTION)
        self.device = init_distributed()
        hf_config = scalar_head_config(AutoConfig.from_pretrained(config["model_name"]))
        source = model_source(
            config,
            hf_config,
            AutoModelForSequenceClassification,
            section=_SECTION,
            random_init=False,  # a reward model without its weights scores nothing
            seed=0,
        )
        self.model, self.hf_model = build_sharded_model(
            source,
            ScalarHeadModel,
            mesh=build_mesh(self.device),
            device=self.device,
            options=fsdp_options(config),
            adapt=None,
        )
        for module in self.model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0

    def score(self, data: BatchedDataDict, micro_batches: MicroBatches) -> BatchedDataDict:
        """The reward of each sequence of this worker's shard.

        Args:
            data: ``input_ids [N, T]`` right-padded, ``input_lengths [N]`` (N may be 0).
            micro_batches: how to cut the shard.

        Returns:
            ``{"rewards": [N]}`` float32 on CPU: the head's output at each row's last token,
            which is what ``AutoModelForSequenceClassification`` returns for the row alone.
        """
        rewards = inference_scores(self.model, data, micro_batches, self.device)
        return BatchedDataDict({"rewards": rewards}, group_size=data.group_size)

    def shutdown(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()
