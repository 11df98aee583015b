"""The scalar-head model the critic and the reward model share.

Both are a Hugging Face sequence-classification model with one label
(``AutoModelForSequenceClassification``, ``num_labels=1``): the causal backbone and a linear
``score`` head of one output. Its checkpoints and exports load with that class, a policy
checkpoint gives it its backbone (the head then starts random), and a reward model's its head
too: what TRL's and OpenRLHF's critics are.

The head is applied to the hidden state at chosen positions, in the layout of the policy's
log-probs: the output at position ``t`` comes from the hidden state at ``t - 1``, i.e. it is the
value of the state in which token ``t`` was generated (``values [N, T]`` on the response tokens,
what GAE reads), and at ``t = input_lengths`` (one past the last token) it is the score of the
whole sequence (what a reward model returns, and what Hugging Face's sequence classification
pools: the last token's output).
"""

import copy

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from rl_toolkit.config_schema import MicroBatches
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.attention import packed_row_kwargs
from rl_toolkit.models.fsdp.build import without_dropout
from rl_toolkit.models.fsdp.loops import forward_at, inference_outputs, on_grid, scored_positions


def scalar_head_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``hf_config`` for a one-label sequence-classification model, dropout off."""
    config = without_dropout(hf_config)
    config.num_labels = 1
    return config


class ScalarHeadModel(nn.Module):
    """A one-label sequence-classification model whose forward returns its head's output at
    chosen positions (float32), so that the FSDP2 root (this module) holds the head.

    Args:
        classifier: a Hugging Face ``*ForSequenceClassification`` model with ``num_labels=1``
            and its head in ``score`` (Llama, Qwen, Mistral, Gemma and most decoder models).

    Raises:
        ValueError: the model has no such head.
    """

    def __init__(self, classifier: PreTrainedModel) -> None:
        super().__init__()
        head = getattr(classifier, "score", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ValueError(
                f"{type(classifier).__name__}: a scalar-head model needs a one-output linear "
                "head `score` (a decoder model's AutoModelForSequenceClassification with "
                "num_labels=1)"
            )
        self.classifier = classifier

    def forward(
        self,
        input_ids: torch.Tensor,
        target_index: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The head's output on the hidden state just before each position of ``target_index``.

        Args:
            input_ids: ``[b, T]`` padded rows, or one packed row ``[1, L]``.
            target_index: ``[n]`` flat positions in ``input_ids.view(-1)`` (or one past a row's
                last token), none of them the first token of a sequence.
            attention_mask, position_ids, cu_seq_lens: as ``LogprobModel.forward``.

        Returns:
            ``[n]`` float32.
        """
        hidden = self.classifier.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **packed_row_kwargs(cu_seq_lens),
        ).last_hidden_state  # (b, T, H)
        selected = hidden.reshape(-1, hidden.shape[-1])[target_index - 1]  # (n, H)
        scores = self.classifier.get_submodule("score")(selected)  # (n, 1)
        # A sum over the one output, not a squeeze: FSDP2 warns about a view as the output.
        return scores.sum(dim=-1, dtype=torch.float32)


def token_values(
    model: nn.Module, micro_batch: BatchedDataDict, micro_batches: MicroBatches
) -> torch.Tensor:
    """``[b, T]`` the head's output at every response token (``token_mask``), 0.0 elsewhere:
    the value of the state each token was generated in."""
    scored, rows, cols = scored_positions(micro_batch, response_only=True)
    flat = forward_at(model, micro_batch, packed=micro_batches.packed, rows=rows, cols=cols)
    return on_grid(flat, scored, rows, cols)


def sequence_scores(
    model: nn.Module, micro_batch: BatchedDataDict, micro_batches: MicroBatches
) -> torch.Tensor:
    """``[b]`` the head's output after each row's last token: the score of the sequence."""
    lengths = micro_batch["input_lengths"]
    rows = torch.arange(lengths.shape[0], device=lengths.device)
    return forward_at(model, micro_batch, packed=micro_batches.packed, rows=rows, cols=lengths)


def inference_scores(
    model: nn.Module, data: BatchedDataDict, micro_batches: MicroBatches, device: torch.device
) -> torch.Tensor:
    """``[N]`` sequence scores of this worker's shard, without gradients (collective)."""
    return inference_outputs(
        model,
        data,
        micro_batches,
        lambda micro_batch: sequence_scores(model, micro_batch, micro_batches),
        shape=(data.size,),
        device=device,
    )


def exported_config(hf_config: PretrainedConfig, hf_model: PreTrainedModel) -> PretrainedConfig:
    """The config an export of ``hf_model`` carries: its own class as the architecture, so that
    the folder names what it holds (a sequence classifier, not the source's causal LM)."""
    config = copy.deepcopy(hf_config)
    config.architectures = [type(hf_model).__name__]
    return config
