"""Knowledge distillation: the student's loss against a teacher's logits, and loading the teacher.

Owns the combined loss both training loops use when ``train.distill.teacher`` is set (lm.train.loop
on Ray Train + DeepSpeed, lm.train.local in one process), the check that a teacher fits the data
(same tokenizer, long enough context) and loading it frozen on the worker's device:

    teacher = load_teacher(store, cfg.train.distill.teacher, tokenizer, cfg.seq_len, "fp32", device)
    parts = distill_loss(student_logits, teacher_logits(teacher, x), y, temperature=1.0, weight=0.5)
    parts.loss.backward()   # (1 - w) CE + w T² KL(softmax(teacher / T) ‖ softmax(student / T))

Enable it with ``lm train -c configs/tiny.yaml train.distill.teacher=<run>/model``; the unit tests
(tests/unit/test_distill.py) check the loss and that a distilled student beats one trained alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm.config import ConfigError, join_uri
from lm.loss_mask import IGNORE
from lm.storage import ObjectStore
from lm.tokenizer import BPETokenizer

FIELD = "train.distill.teacher"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistillLoss:
    loss: torch.Tensor  # what to back-propagate: (1 - w) ce + w T² kl
    ce: torch.Tensor  # cross-entropy against the targets (detached)
    kl: torch.Tensor  # KL(teacher ‖ student) at temperature T, per position with a target (detached)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, *, temperature: float,
                 weight: float, ignore_index: int = IGNORE) -> DistillLoss:
    """The distillation loss of logits ``student`` [B, T, V_s] against ``teacher`` [B, T, V_t] and
    ``targets`` [B, T]; both terms are means over the positions whose target is not ``ignore_index``.

    Vocabularies of different widths (padding rows above the tokenizer's vocabulary) are aligned: the
    teacher's distribution is taken over the first min(V_s, V_t) ids, the student's over all of its own.
    """
    if student.shape[:-1] != teacher.shape[:-1] or student.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(student.shape)} (student), {tuple(teacher.shape)} (teacher) and targets "
                         f"{tuple(targets.shape)} must agree on [batch, positions]")
    vocab = min(student.size(-1), teacher.size(-1))
    ce = F.cross_entropy(student.reshape(-1, student.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)
    log_p = F.log_softmax(teacher[..., :vocab].float() / temperature, dim=-1)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)[..., :vocab]
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    keep = (targets != ignore_index).to(per_position.dtype)
    kl = (per_position * keep).sum() / keep.sum().clamp(min=1)
    loss = (1 - weight) * ce + weight * temperature**2 * kl
    return DistillLoss(loss, ce.detach(), kl.detach())


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The frozen teacher's logits [B, T, V] for ``inputs`` (no graph kept)."""
    return teacher(inputs)[0]


def check_teacher(store: ObjectStore, uri: str, tokenizer: BPETokenizer | None, seq_len: int) -> dict:
    """Refuse a teacher that cannot teach on this data, before any work: it must be a model directory
    whose tokenizer is the data's (skipped when ``tokenizer`` is None: data not prepared yet) and whose
    context holds ``seq_len`` tokens. Returns its config.json."""
    config_uri, tokenizer_uri = join_uri(uri, "config.json"), join_uri(uri, "tokenizer.json")
    if not (store.exists(config_uri) and store.exists(tokenizer_uri)):
        raise ConfigError(f"{FIELD}={uri}: not a model directory (config.json and tokenizer.json needed; "
                          "train the teacher first, e.g. `lm train`, and point at its <run>/model)")
    config = json.loads(store.read_text(config_uri))
    context = config.get("max_position_embeddings", 0)
    if context < seq_len:
        raise ConfigError(f"{FIELD}={uri}: its context is {context} tokens, shorter than the training sequences "
                          f"({seq_len}); use a teacher with max_seq_len >= {seq_len} or a shorter data.seq_len")
    if tokenizer is None:
        return config
    theirs = BPETokenizer.from_json(store.read_text(tokenizer_uri))
    if theirs.fingerprint() != tokenizer.fingerprint():
        raise ConfigError(
            f"{FIELD}={uri}: its tokenizer ({theirs.vocab_size} tokens, {theirs.fingerprint()}) is not the data's "
            f"({tokenizer.vocab_size} tokens, {tokenizer.fingerprint()}); a teacher's logits only mean something "
            "over the same vocabulary: prepare the data with the teacher's tokenizer (e.g. its run's data.output)")
    if config.get("vocab_size", 0) < tokenizer.vocab_size:
        raise ConfigError(f"{FIELD}={uri}: its vocab_size {config.get('vocab_size')} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size}")
    return config


def check_run_teacher(cfg, store: ObjectStore) -> None:
    """:func:`check_teacher` of ``cfg.train.distill.teacher`` against ``cfg``'s prepared data (its
    manifest's tokenizer; only the directory and context while no data is prepared yet): what the
    driver runs before preparing data and before starting Ray Train. No-op without a teacher."""
    from lm.data.manifest import MANIFEST, read_manifest

    if not cfg.train.distill.teacher:
        return
    data, tokenizer = cfg.data_uri, None
    if store.exists(join_uri(data, MANIFEST)):
        manifest = read_manifest(store, data)
        tokenizer = BPETokenizer.from_json(store.read_text(manifest.tokenizer_uri(data)))
    check_teacher(store, cfg.train.distill.teacher, tokenizer, cfg.seq_len)


def load_teacher(store: ObjectStore, uri: str, tokenizer: BPETokenizer, seq_len: int, precision: str,
                 device: torch.device | str) -> torch.nn.Module:
    """The checked teacher (:func:`check_teacher`) on ``device`` in the training ``precision``
    (fp32 / bf16 / fp16), in eval mode with every parameter frozen."""
    from lm.modeldir import load_model_dir

    check_teacher(store, uri, tokenizer, seq_len)
    model = load_model_dir(store, uri, device=str(device)).model
    model.to(DTYPES[precision]).eval()
    model.requires_grad_(False)
    return model


def lineage(distill) -> dict | None:
    """What lineage.json records of a distilled run (``distill``: the train.distill section); None when off."""
    if not distill.teacher:
        return None
    return {"teacher": distill.teacher, "temperature": distill.temperature, "weight": distill.weight}
