"""Teacher signals: where the KD targets of a micro-batch come from.

The loss (:mod:`llmneo.losses`) only sees the teacher's targets for the *selected* positions (those
that predict a label, given by host-computed indices: :func:`llmneo.losses.target_positions`). A
signal produces them:

- :class:`OnlineTeacher`: a frozen teacher model run on the same inputs as the student (no grad);
  for the chunked loss only its final hidden states are computed here and its head runs chunk by
  chunk inside the loss (:class:`llmneo.losses.TeacherHead`); for the naive loss, its full logits;
- :class:`CachedTopK`: the top-k log-probabilities the teacher step cached (``teacher.mode=offline``,
  :mod:`llmneo.topk`); no teacher model is loaded. Its rows travel with the micro-batch
  (:meth:`TeacherSignal.batch_rows`), so they are moved to the device with it.

A new teacher source (another cache format, a remote teacher) is one more subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from llmneo.errors import UserError
from llmneo.heads import logits_head
from llmneo.losses import TeacherHead, TeacherTopK, gather_positions


class TeacherSignal(ABC):
    """The teacher's targets for the selected positions of a micro-batch."""

    def batch_rows(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Tensors this signal needs in the micro-batch of train rows ``indices`` (none by default)."""
        return {}

    @abstractmethod
    def targets(self, model_inputs: dict, index: torch.Tensor, rows: dict[str, torch.Tensor], *,
                chunked: bool) -> torch.Tensor | TeacherHead | TeacherTopK:
        """Targets of the positions ``index`` (:func:`llmneo.losses.target_positions`, row-major):
        ``model_inputs`` are the student's forward arguments, ``rows`` what :meth:`batch_rows` added; ``chunked``: for
        :func:`llmneo.losses.chunked_distill_loss` (else for :func:`llmneo.losses.selected_loss`)."""


class OnlineTeacher(TeacherSignal):
    """A frozen teacher model, run in every step."""

    def __init__(self, model: nn.Module):
        self.model = model

    def targets(self, model_inputs, index, rows, *, chunked):
        with torch.no_grad():
            if not chunked:  # full [B, L, V'] logits: the reference / benchmark baseline
                return gather_positions(self.model(**model_inputs).logits, index)
            # hidden states only; the teacher head runs per loss chunk on the selected positions
            hidden = gather_positions(self.model.get_decoder()(**model_inputs).last_hidden_state, index)
        return TeacherHead(hidden, logits_head(self.model))  # with the model's soft-capping


class CachedTopK(TeacherSignal):
    """The teacher step's top-k cache (:class:`llmneo.topk.TopKCache`) of the train split; row ``i``
    holds the targets of train row ``i``'s ``targets_per_row[i]`` labelled positions. Its ids are
    checked on the host to be below the cache's ``vocab_size`` (the student's, checked by the trainer)."""

    def __init__(self, cache, targets_per_row: Sequence[int]):
        self.cache = cache
        self.targets_per_row = targets_per_row

    def batch_rows(self, indices):
        ids, logprobs = [], []
        for i in indices:
            row_ids, row_lps = self.cache[i]
            if row_ids.shape[0] != self.targets_per_row[i]:
                raise UserError(f"top-k cache row {i} has {row_ids.shape[0]} positions, the dataset row "
                                f"has {self.targets_per_row[i]} labelled positions: re-run the teacher step")
            # checked here, on the host: the loss then never asks the device (see TeacherTopK.in_vocab)
            if row_ids.numel() and not 0 <= int(row_ids.min()) <= int(row_ids.max()) < self.cache.vocab_size:
                raise UserError(f"top-k cache row {i} has token ids outside [0, {self.cache.vocab_size}): "
                                f"re-run the teacher step")
            ids.append(row_ids)
            logprobs.append(row_lps)
        return {"topk_ids": torch.cat(ids), "topk_logprobs": torch.cat(logprobs)}

    def targets(self, model_inputs, index, rows, *, chunked):
        return TeacherTopK(rows["topk_ids"], rows["topk_logprobs"], in_vocab=True)
