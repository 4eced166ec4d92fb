"""Generation metrics: BLEU and ROUGE of continuations, precision / recall / F1 of label choices, samples.

* BLEU (sacrebleu ``corpus_bleu``, 0–100) and ROUGE-1/2/L (rouge-score, mean F1, 0–1) of the model's
  greedy continuation of each prompt against its reference;
* labelled prompts: the model picks, among all the set's labels, the one whose tokens it finds most
  likely (summed log-probability) right after the prompt; scored with scikit-learn (accuracy, macro and
  per-label precision / recall / F1);
* qualitative samples for fixed prompts, with the ``generate`` section's sampling settings.

    scores = bleu_rouge(hypotheses, references)
    chosen = choose_labels(model, tok, prompts, labels)
    scores = classification_scores(truth, chosen, labels)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lm.config import GenerateConfig
from lm.inference import cut_at_stop, generate_text
from lm.model import Transformer
from lm.tokenizer import BPETokenizer


def bleu_rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (0–100) and mean ROUGE-1/2/L F1 (0–1) of ``hypotheses`` against one reference each."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need as many hypotheses as references (> 0), got {len(hypotheses)} and {len(references)}")
    kinds = ["rouge1", "rouge2", "rougeL"]
    scorer = rouge_scorer.RougeScorer(kinds)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references, strict=True)]
    out = {"bleu": float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)}
    out.update({k: float(np.mean([s[k].fmeasure for s in scores])) for k in kinds})
    return out


def classification_scores(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro precision / recall / F1 and per-label scores (scikit-learn; 0 where undefined)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    labels = list(labels)
    p, r, f, support = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    macro = precision_recall_fscore_support(truth, predicted, labels=labels, average="macro", zero_division=0)
    per_label = {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
                 for i, lab in enumerate(labels)}
    return {"accuracy": float(accuracy_score(truth, predicted)), "precision_macro": float(macro[0]),
            "recall_macro": float(macro[1]), "f1_macro": float(macro[2]), "per_label": per_label}


@torch.no_grad()
def continuation_logprobs(model: Transformer, tok: BPETokenizer, prompts: Sequence[str],
                          continuations: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """ln P(continuation | prompt) summed over the continuation's tokens, for each (prompt, continuation)
    pair; a prompt too long for the context keeps its last tokens."""
    max_len = model.cfg.max_seq_len
    pairs = []
    for prompt, cont in zip(prompts, continuations, strict=True):
        c = tok.encode(cont)
        if not c or len(c) >= max_len:
            raise ValueError(f"continuation {cont!r} has {len(c)} tokens; need 1 to {max_len - 1}")
        p = (tok.encode(prompt) or [tok.eos_id])[-(max_len - len(c)):]
        pairs.append((p, c))
    out = np.zeros(len(pairs))
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)  # right padding: never seen (causal)
        for i, (p, c) in enumerate(chunk):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        logp = torch.log_softmax(model(ids)[0].float(), dim=-1)
        for i, (p, c) in enumerate(chunk):
            positions = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            out[start + i] = logp[i, positions, torch.tensor(c)].double().sum().item()
    return out


def choose_labels(model: Transformer, tok: BPETokenizer, prompts: Sequence[str], labels: Sequence[str]) -> list[str]:
    """For each prompt, the label with the highest log-likelihood as its continuation."""
    labels = list(labels)
    scores = continuation_logprobs(model, tok, [p for p in prompts for _ in labels], labels * len(prompts))
    return [labels[i] for i in scores.reshape(len(prompts), len(labels)).argmax(axis=1)]


def greedy_continuations(model: Transformer, tok: BPETokenizer, prompts: Sequence[str], max_new_tokens: int,
                         stop: Sequence[str]) -> list[str]:
    """Greedy continuation of each prompt (its last tokens if too long), cut at the first stop string
    after the leading whitespace."""
    budget = max(1, model.cfg.max_seq_len - max_new_tokens)
    ids = [(tok.encode(p) or [tok.eos_id])[-budget:] for p in prompts]

    def stop_hook(_row: int, new_ids: list[int]) -> bool:  # leading whitespace never stops a row
        return cut_at_stop(tok.decode(new_ids).lstrip(), list(stop))[1]

    outputs = model.generate(ids, max_new_tokens, temperature=0.0, eos_id=tok.eos_id, seed=0,
                             stop=stop_hook if stop else None)
    return [cut_at_stop(tok.decode(o).lstrip(), list(stop))[0].strip() for o in outputs]


def generation_scores(model: Transformer, tok: BPETokenizer, examples: list[dict[str, str]], max_new_tokens: int,
                      stop: Sequence[str]) -> dict:
    """BLEU / ROUGE of greedy continuations of ``examples`` ({prompt, reference}), plus a few of them."""
    outputs = greedy_continuations(model, tok, [e["prompt"] for e in examples], max_new_tokens, stop)
    scores = bleu_rouge(outputs, [e["reference"] for e in examples])
    shown = [{**e, "output": o} for e, o in zip(examples[:5], outputs, strict=False)]
    return {**scores, "examples": len(examples), "shown": shown}


def label_scores(model: Transformer, tok: BPETokenizer, examples: list[dict[str, str]]) -> dict:
    """Precision / recall / F1 of the model's label choices on ``examples`` ({prompt, label})."""
    labels = sorted({e["label"] for e in examples})
    if len(labels) < 2:
        raise ValueError(f"a labelled set needs at least 2 distinct labels, got {labels}")
    chosen = choose_labels(model, tok, [e["prompt"] for e in examples], labels)
    truth = [e["label"] for e in examples]
    return {**classification_scores(truth, chosen, labels), "labels": labels, "examples": len(examples)}


def samples(model: Transformer, tok: BPETokenizer, prompts: Sequence[str], gen: GenerateConfig) -> list[dict]:
    """Qualitative generations for fixed prompts (sampling settings of ``gen``)."""
    if not prompts:
        return []
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, generate_text(model, tok, list(prompts), gen),
                                                           strict=True)]
