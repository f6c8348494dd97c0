"""Stage 1: supervised fine-tuning with cross-entropy on assistant tokens only.

``loss = -sum_t m_t log p(y_t | y_<t, x) / sum_t m_t`` over the labelled (answer) tokens, through
:func:`unveil.models.policy.answer_logprobs`: only answer positions reach the LM head, in chunks
(the full-vocabulary logits of a 7B model over a 1,100-token row would be ~0.7 GB in fp32 alone).

Also UMed-LVLM's abnormal-aware instruction tuning (same loss, MAU-style data) and
STLLaVA-Med's stage 1 (``train_on_virtual_user``: question tokens of virtual-user turns
are trained on too; ``sq_r``: later human turns become virtual-user turns with that probability,
drawn afresh each epoch from ``sq_seed``, :mod:`unveil.data.virtual_user`).
"""

from __future__ import annotations

from unveil.data.collate import SFTCollator
from unveil.models.inputs import model_inputs
from unveil.models.policy import answer_logprobs
from unveil.stages.base import StageModule


class SFTModule(StageModule):
    def __init__(
        self,
        backbone,
        optim: dict | None = None,
        train_on_virtual_user: bool = False,
        sq_r: float = 0.0,
        sq_seed: int = 0,
    ):
        super().__init__(backbone, optim)
        self.collator = SFTCollator(backbone, train_on_virtual_user=train_on_virtual_user, sq_r=sq_r, seed=sq_seed)

    def on_train_epoch_start(self):
        # before the epoch's loader iterator starts its workers: they read the epoch from shared memory
        self.collator.epoch.fill_(self.current_epoch)

    def forward(self, batch):
        """The mean negative log-likelihood of the batch's labelled tokens."""
        logps, mask = answer_logprobs(self.model, model_inputs(batch), batch["labels"])
        return -(logps * mask).sum() / mask.sum().clamp(min=1)

    def training_step(self, batch, batch_idx):
        loss = self(batch)
        n_tok = (batch["labels"] != -100).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/answer_tokens", n_tok.float(), reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss
