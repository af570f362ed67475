from __future__ import annotations

import random

import pytest
import torch
from sacrebleu.metrics import BLEU as SacreBLEU
from sacrebleu.metrics import CHRF as SacreCHRF

from lightning_peft.metrics import BLEU, ChrF, Rouge, generation_metrics

WORDS = ["A", "man", "woman", "dog", "runs", "sits", "on", "the", "grass", "Red", "hat", ".", ",", "is", "in"]


def corpus(seed: int, n: int = 40) -> tuple[list[str], list[str]]:
    """References and noisy hypotheses (words dropped, swapped, replaced; mixed case), deterministic per seed."""
    rng = random.Random(seed)
    references, hypotheses = [], []
    for _ in range(n):
        reference = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        hypothesis = [w.lower() if rng.random() < 0.3 else w for w in reference if rng.random() > 0.2]
        if len(hypothesis) > 2 and rng.random() < 0.5:
            i = rng.randrange(len(hypothesis) - 1)
            hypothesis[i], hypothesis[i + 1] = hypothesis[i + 1], hypothesis[i]
        hypothesis += [rng.choice(WORDS) for _ in range(rng.randint(0, 2))]
        references.append(" ".join(reference))
        hypotheses.append(" ".join(hypothesis))
    return hypotheses, references


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("lowercase", [False, True])
def test_bleu_and_chrf_match_sacrebleu(seed, lowercase):
    hypotheses, references = corpus(seed)
    bleu, chrf = BLEU(lowercase=lowercase), ChrF(lowercase=lowercase)
    for start in range(0, len(hypotheses), 7):  # several updates, as batches in an epoch
        chunk = slice(start, start + 7)
        targets = [[r] for r in references[chunk]]
        bleu.update(hypotheses[chunk], targets)
        chrf.update(hypotheses[chunk], targets)
    expected_bleu = SacreBLEU(lowercase=lowercase).corpus_score(hypotheses, [references]).score
    expected_chrf = SacreCHRF(lowercase=lowercase).corpus_score(hypotheses, [references]).score
    assert bleu.compute().item() == pytest.approx(expected_bleu, abs=0.01)  # float32 states
    assert chrf.compute().item() == pytest.approx(expected_chrf, abs=0.01)


def test_rouge_reports_f_measures_on_a_100_scale():
    rouge = Rouge()
    rouge.update(["a cat sat"], [["a cat sat down"]])
    scores = rouge.compute()
    assert set(scores) == {"rouge1", "rouge2", "rougeL"}
    # unigrams: precision 3/3, recall 3/4 → F 6/7; bigrams: 2/2 and 2/3 → F 4/5
    assert scores["rouge1"].item() == pytest.approx(600 / 7, abs=1e-3)
    assert scores["rouge2"].item() == pytest.approx(80.0, abs=1e-3)


def test_collection_names_and_perfect_scores():
    metrics = generation_metrics(lowercase=True).clone(prefix="test/")
    metrics.update(["A man runs on the grass ."], [["a man runs on the grass ."]])
    values = metrics.compute()
    assert set(values) == {"test/bleu", "test/chrf", "test/rouge1", "test/rouge2", "test/rougeL"}
    assert all(torch.isclose(v, torch.tensor(100.0)) for v in values.values())
