"""Shared pieces of the integration tests: offline Hugging Face, the examples, a tiny model.

Nothing is downloaded: the sentence-transformers model is a one-layer BERT of width 16 built
from a random config, with a tokenizer built in memory from a word list; both are saved to a temporary folder,
from which sentence-transformers loads them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "fast",
    "slow",
    "big",
    "small",
    "red",
    "blue",
    "car",
    "bus",
    "sun",
    "moon",
    "sky",
    "sea",
    "tree",
    "house",
    "river",
    "road",
    "bird",
    "fish",
    "green",
    "old",
    "new",
    "quick",
    "happy",
    "sad",
]


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (loaded once)."""
    key = f"_embedloss_example_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random one-layer BERT (no dropout) and its word-level tokenizer, saved locally."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    assert 1 not in tokenizer(" ".join(WORDS))["input_ids"]  # every word known (no [UNK])
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def st_model(tiny_bert_dir: Path):
    """A fresh ``SentenceTransformer`` (mean pooling) on the tiny BERT."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(tiny_bert_dir), max_seq_length=16)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


def sentences(n: int, seed: int, length: int = 5) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n, length), generator=g)
    return [" ".join(WORDS[int(i)] for i in row) for row in idx]
