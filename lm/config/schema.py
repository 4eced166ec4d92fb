"""The config schema: one pydantic section per lifecycle stage, every field documented.

Loading (YAML + dotted overrides) lives in ``lm.config.load``, the ``train`` section in
``lm.config.train``; import everything from ``lm.config``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, model_validator

from lm.config.base import PATH, Section, absolute_paths
from lm.config.base import ConfigError as ConfigError  # re-exported
from lm.config.continual import ContinualConfig
from lm.config.eval import EvalConfig
from lm.config.quality import DecontamConfig, PIIConfig, QualityConfig
from lm.config.rag import RagConfig
from lm.config.serve import ServeConfig
from lm.config.sft import SFTConfig
from lm.config.sources import SourceConfig
from lm.config.train import TrainConfig
from lm.config.tune import TuneConfig
from lm.uri import join_uri


class StorageConfig(Section):
    """Object storage (lm.storage): where every artifact of every run lives, a local folder or S3."""

    root: Annotated[str, PATH] = Field(
        "./lmforge-store",
        description="Object-store root for every artifact: a local folder, file:// URI or s3://bucket/prefix.",
    )
    endpoint_url: str | None = Field(
        None, description="S3 endpoint (e.g. http://127.0.0.1:8333); default: AWS_ENDPOINT_URL or AWS itself."
    )
    region: str | None = Field(None, description="S3 region; default: AWS_REGION, else us-east-1.")
    access_key_id: SecretStr | None = Field(None, description="S3 access key; default: AWS_ACCESS_KEY_ID.")
    secret_access_key: SecretStr | None = Field(
        None, description="S3 secret key; default: AWS_SECRET_ACCESS_KEY. Never logged."
    )
    multipart_threshold_mb: int = Field(
        64, ge=5, description="Uploads at or above this size (MiB) use S3 multipart upload."
    )


class CleanConfig(Section):
    """Document cleaning (pure functions in lm.data.clean); every dropped document is counted by reason."""

    normalize: Literal["none", "NFC", "NFKC"] = Field("NFC", description="Unicode normalisation form.")
    remove_control_chars: bool = Field(
        True, description="Drop control characters (Unicode category C*) except newline and tab."
    )
    normalize_whitespace: bool = Field(
        True,
        description="Unify line endings, turn odd spaces into ' ', strip line ends, at most 2 newlines in a row, "
        "strip the ends.",
    )
    lowercase: bool = Field(False, description="Lower-case everything (off for LM training).")
    remove_special_chars: bool = Field(
        False, description="Keep only letters, digits, whitespace and basic punctuation (off for LM training)."
    )
    min_chars: int = Field(1, ge=0, description="Drop documents shorter than this after cleaning (reason too_short).")
    max_chars: int = Field(
        5_000_000, ge=1, description="Drop documents longer than this after cleaning (reason too_long)."
    )
    max_duplicate_line_fraction: float = Field(
        0.5, ge=0, le=1,
        description="Drop if more than this share of non-empty lines are repeats (reason repetitive_lines)."
    )
    repetition_ngram: int = Field(3, ge=1, description="Word n-gram size for the n-gram repetition filter.")
    max_duplicate_ngram_fraction: float = Field(
        0.5, ge=0, le=1,
        description="Drop if more than this share of word n-grams are repeats (reason repetitive_ngrams); 1 disables.",
    )
    invalid_utf8: Literal["replace", "drop"] = Field(
        "replace",
        description="Bytes that are not UTF-8: replace with U+FFFD, or drop the document (reason invalid_utf8)."
    )


class DedupConfig(Section):
    """Global deduplication across all sources (lm.data.dedup)."""

    exact: bool = Field(True, description="Drop exact duplicates (same hash of the cleaned text), keeping one.")
    near: bool = Field(True, description="Drop near-duplicates found by MinHash + LSH, keeping one per cluster.")
    threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity that makes a near-duplicate.")
    num_perm: int = Field(128, ge=8, description="MinHash permutations (signature length).")
    bands: int = Field(
        16, ge=1, description="LSH bands; num_perm must be divisible by it (rows per band = num_perm/bands).")
    shingle: int = Field(5, ge=1, description="Word n-gram (shingle) size for MinHash.")
    seed: int = Field(42, description="Seed of the MinHash permutations.")

    @model_validator(mode="after")
    def _check_bands(self) -> DedupConfig:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be divisible by bands ({self.bands})")
        return self


class DataConfig(Section):
    """The data pipeline (lm.data, `lm data prepare`): sources → cleaned, deduplicated, split, tokenized and
    packed Parquet shards + manifest, on Ray Data."""

    format: Literal["text", "sft"] = Field(
        "text", description="text: documents for language modelling (loss on every token); sft: prompt / "
        "response JSONL records (data.sft) rendered with the chat template, loss on the response only.",
    )
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(name="tinyshakespeare", uri="bundled://tinyshakespeare")],
        description="Corpora to read.",
    )
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    languages: list[str] = Field(
        default_factory=lambda: ["en"], description="Keep documents whose language (py3langid, ISO 639-1 codes "
        "such as en, de, fr; identified after cleaning) is one of these (reason language); [] = no language filter.",
    )
    language_min_score: float = Field(
        0.5, ge=0, le=1, description="The identified language must have at least this probability (else reason "
        "language).",
    )
    quality: QualityConfig = Field(default_factory=QualityConfig)
    pii: PIIConfig = Field(default_factory=PIIConfig)
    decontaminate: DecontamConfig = Field(default_factory=DecontamConfig)
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of documents held out for validation (by a hash of the document id)."
    )
    test_fraction: float = Field(0.0, ge=0, lt=1, description="Share of documents held out for test.")
    seq_len: int | None = Field(
        None, ge=1, description="Tokens per packed training row (rows hold seq_len + 1); null = model.max_seq_len."
    )
    rows_per_shard: int = Field(4096, ge=1, description="Packed rows per Parquet shard.")
    output: Annotated[str | None, PATH] = Field(
        None, description="Where shards + manifest go; null = <run>/data.")
    shuffle_partitions: int = Field(
        4, ge=1, description="Fewest partitions of each Ray Data groupby (exact and near dedup, sharding) under "
        "shuffle_strategy=default; more as the data grows (block_mb).",
    )
    block_mb: float = Field(
        32, gt=0, description="What one Ray Data task of the pipeline holds, in MiB, whatever the corpus size: "
        "the target block size (Ray's DataContext.target_max_block_size) and, under shuffle_strategy=default, "
        "the size each groupby partition stays under (partitions = max(shuffle_partitions, data / block_mb)); "
        "the sort strategy cuts one partition per input block. A task holds a few times this (a sorting reduce "
        "about 3x); shuffle blocks wait in Ray's object store, which spills to disk when full.",
    )
    shuffle_strategy: Literal["sort", "default"] = Field(
        "sort", description="Ray Data shuffle for the groupbys: sort (pull-based; fastest on small clusters) or Ray's "
        "default (hash shuffle, Ray 2.60's SHUFFLE_V2).",
    )
    tokenize_actors: int = Field(1, ge=1, description="Tokenizer actors in the Ray Data actor pool.")
    actor_cpus: float = Field(
        0.5, gt=0, description="CPUs per tokenizer actor (fractional, so read tasks can always be scheduled)."
    )
    max_file_mb: float = Field(
        1024, gt=0, description="Skip (and report) single files larger than this many MiB (reason too_large)."
    )
    seed: int = Field(1234, description="Seed for the tokenizer-training sample and shard shuffling.")
    sft: SFTConfig = Field(default_factory=SFTConfig)

    @model_validator(mode="after")
    def _check_fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave documents for training")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if self.format == "sft" and (bad := [s.name for s in self.sources if s.format not in ("auto", "jsonl")]):
            raise ValueError(f"format sft reads JSONL records; sources {bad} declare another format")
        return self


class TokenizerConfig(Section):
    """The byte-level BPE tokenizer (lm.tokenizer, `lm tokenizer train`), trained on the train split."""

    vocab_size: int = Field(4096, ge=300, description="BPE vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="A merge needs at least this many occurrences.")
    eos_token: str = Field("<|endoftext|>", description="End-of-text token appended after every document.")
    pad_token: str = Field("<|pad|>", description="Padding token.")
    extra_special_tokens: list[str] = Field(
        default_factory=lambda: ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        description="Reserved tokens (chat roles) that are never split or merged.",
    )
    max_train_bytes: int = Field(
        50_000_000, ge=1, description="Train on at most this many bytes of the (streamed) train documents."
    )

    @property
    def special_tokens(self) -> list[str]:
        return [self.eos_token, self.pad_token, *self.extra_special_tokens]


class ModelConfig(Section):
    """The Llama-style decoder-only transformer (lm.model): RMSNorm, RoPE, SwiGLU, grouped-query attention."""

    n_layers: int = Field(4, ge=1, description="Number of transformer blocks.")
    n_heads: int = Field(4, ge=1, description="Attention (query) heads.")
    n_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads for grouped-query attention; null = n_heads (plain MHA)."
    )
    d_model: int = Field(128, ge=8, description="Residual stream width (hidden_size).")
    d_ff: int | None = Field(
        None, ge=1, description="SwiGLU hidden size (intermediate_size); null = 8/3·d_model rounded up to 64."
    )
    d_head: int | None = Field(
        None, ge=2, description="Width of one attention head (head_dim; even, for RoPE); null = d_model / n_heads. "
        "Set when heads were pruned away (lm prune --method heads), so n_heads x d_head < d_model.",
    )
    max_seq_len: int = Field(256, ge=2, description="Context length (max_position_embeddings).")
    vocab_size: int = Field(4096, ge=2, description="Embedding rows; the tokenizer's vocab size is used when smaller.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on attention output, MLP output and embeddings.")
    attention_dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout on the attention weights (Llama's attention_dropout); null = "
        "model.dropout. On CPU any is costly: attention then leaves its fused kernel (jobs/bench/time_to_quality.py).")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the output projection.")
    activation: Literal["silu", "relu2"] = Field(
        "silu", description="The gated MLP's activation: silu (SwiGLU, Llama's) or relu2 (gated ReLU², "
        "transformers' hidden_act relu2).")
    logit_softcap: float | None = Field(
        None, gt=0, description="Soft-cap the logits to ±c with c·tanh(logits / c) (Gemma 2's final cap); null = "
        "none. No Llama or Qwen3 equivalent: the model directory is then lmforge's own (model_type "
        "lmforge-softcap, which transformers refuses); measured in jobs/bench/time_to_quality.py, in no preset.")
    qk_norm: bool = Field(False, description="RMSNorm on each head's queries and keys before RoPE (Qwen3's "
                          "QK-norm); the model directory is then a Qwen3ForCausalLM one, not Llama.")
    init_std: float = Field(
        0.02, gt=0, description="Std of the normal init; residual projections get std/sqrt(2·n_layers).")

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.d_head is not None:
            if self.d_head % 2:
                raise ValueError(f"d_head ({self.d_head}) must be even for RoPE")
        elif self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        elif (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_dropout(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return -(-(8 * self.d_model // 3) // 64) * 64


class GenerateConfig(Section):
    """Sampling for `lm generate`, the demo's sample and the evaluation report's samples (lm.inference)."""

    prompt: str = Field("ROMEO:", description="Prompt for `lm generate` and the demo sample.")
    max_new_tokens: int = Field(200, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature; 0 = greedy.")
    top_k: int | None = Field(200, ge=1, description="Keep the k most likely tokens; null = all.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass; null = off.")
    stop: list[str] = Field(default_factory=list, description="Stop when any of these strings is generated.")
    ignore_eos: bool = Field(
        False, description="Keep generating past end-of-text (it then shows as <|endoftext|> between documents)."
    )
    seed: int | None = Field(0, description="Sampling seed; null = nondeterministic.")


class Config(Section):
    """Everything one lmforge run needs."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Run name; artifacts go to <storage.root>/runs/<name>.")
    output: Annotated[str | None, PATH] = Field(
        None, description="Where this run's artifacts go (a folder or s3:// URI); null = <storage.root>/runs/<name>."
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)
    rag: RagConfig = Field(default_factory=RagConfig)

    @model_validator(mode="after")
    def _check_lengths(self) -> Config:
        if self.data.seq_len is not None and self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        self.train.check_batch(self.seq_len)  # global_batch_tokens divides evenly at every allowed size
        if self.model.logit_softcap and self.train.loss_kernel != "torch":
            raise ValueError(f"model.logit_softcap needs train.loss_kernel torch (the {self.train.loss_kernel} "
                             "kernel computes uncapped logits)")
        if self.data.format == "sft" and self.continual.feedback_as == "text":
            raise ValueError("continual.feedback_as text needs data.format text: with sft data, feedback pairs "
                             "are supervised examples (feedback_as: sft)")
        return self

    @property
    def seq_len(self) -> int:
        """Tokens per training sequence (the packed rows hold one more)."""
        return self.data.seq_len or self.model.max_seq_len

    @property
    def run_uri(self) -> str:
        """Where this run's artifacts live."""
        return self.output or join_uri(self.storage.root, "runs", self.name)

    @property
    def data_uri(self) -> str:
        """Where this run's prepared data lives (shards, tokenizer, manifest): ``data.output`` or ``<run>/data``."""
        return self.data.output or join_uri(self.run_uri, "data")

    @property
    def feedback_uri(self) -> str:
        """Where Serve records completions and feedback (lm.serve.feedback) and lm.continual reads them."""
        return self.serve.feedback.uri or join_uri(self.storage.root, "feedback")

    @property
    def responses_uri(self) -> str:
        """Where Serve records each response's id, model version and time (lm.serve.feedback, lm.lineage)."""
        return self.serve.responses.uri or join_uri(self.storage.root, "responses")

    @property
    def registry_uri(self) -> str:
        """Where the model registry lives (lm.registry)."""
        return self.continual.registry or join_uri(self.storage.root, "registry")

    @property
    def rag_uri(self) -> str:
        """Where the retrieval index lives (lm.rag)."""
        return self.rag.index or join_uri(self.storage.root, "rag", "index")

    def with_absolute_paths(self) -> Config:
        """A copy whose local paths (every field marked :data:`lm.config.base.PATH`: storage.root, output,
        the sources of data, continual and rag, serve.model, ...) are absolute: what a driver hands to Ray
        workers, which run in another working directory. URIs with a scheme are kept as they are."""
        return absolute_paths(self)

    def public_dict(self) -> dict[str, Any]:
        """The resolved config as plain data, secrets masked (safe to print and store)."""
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """A short stable hash of the resolved config (secrets excluded)."""
        blob = json.dumps(self.public_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
