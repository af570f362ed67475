"""Generation metrics on the 0-100 scale of sacreBLEU's reports: torchmetrics' text metrics, DDP-synchronised."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import MetricCollection
from torchmetrics.text import CHRFScore, SacreBLEUScore
from torchmetrics.text.rouge import ROUGEScore


class BLEU(SacreBLEUScore):
    """Corpus BLEU as ``sacrebleu.corpus_bleu`` reports it (0-100, ``13a`` tokenisation, one reference).

    Example::

        metric = BLEU(lowercase=True)
        metric.update(["a man runs ."], [["A man runs."]])
    """

    def compute(self) -> torch.Tensor:
        return super().compute() * 100


class ChrF(CHRFScore):
    """Corpus chrF (character 6-grams, β=2, no word n-grams) as sacreBLEU's ``CHRF`` reports it, 0-100.

    torchmetrics' own default is chrF++ (word bigrams too); ``n_word_order=2`` gives that.
    """

    def __init__(self, n_word_order: int = 0, **kwargs: object) -> None:
        super().__init__(n_word_order=n_word_order, **kwargs)

    def compute(self) -> torch.Tensor:
        return super().compute() * 100


class Rouge(ROUGEScore):
    """ROUGE F-measures only (``rouge1``, ``rouge2``, ``rougeL``), 0-100."""

    def __init__(self, rouge_keys: Sequence[str] = ("rouge1", "rouge2", "rougeL"), **kwargs: object) -> None:
        super().__init__(rouge_keys=tuple(rouge_keys), **kwargs)

    def compute(self) -> dict[str, torch.Tensor]:
        scores = super().compute()
        return {key.removesuffix("_fmeasure"): value * 100 for key, value in scores.items() if "_fmeasure" in key}


def generation_metrics(lowercase: bool = False) -> MetricCollection:
    """``bleu``, ``chrf``, ``rouge1``, ``rouge2`` and ``rougeL`` of predictions against one reference each.

    Update with ``(predictions, references)`` where ``references`` holds a list of references per prediction
    (ROUGE takes the best-matching one). ROUGE lower-cases always (its tokenizer does); ``lowercase`` applies to
    BLEU and chrF.
    """

    return MetricCollection(
        {"bleu": BLEU(lowercase=lowercase), "chrf": ChrF(lowercase=lowercase), "rouge": Rouge()},
        compute_groups=False,
    )
