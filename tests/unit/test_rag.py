"""lm.rag without Ray: passages, the BM25 index on a folder and on S3, fitting passages into a prompt,
the rag config and `lm rag` errors; the embedding vector of lm.inference; named prompt templates."""

import json

import numpy as np
import pytest
import torch

from lm.cli import main as lm_main
from lm.config import ConfigError, load_config
from lm.inference import embed_ids
from lm.rag import RagError, RagIndex, augment, build_index, cut_passages
from lm.serve import schemas

FACTS = {
    "zembla.txt": "The capital of Zembla is Quixotl, a city of bridges.\n\nZembla exports amber and glass.",
    "orbis.txt": "Orbis Tertius is governed by a council of librarians who vote with lanterns.",
    "weather.txt": "Rain falls on the northern hills every evening; the valleys stay dry.",
}


def rag_cfg(root: str, sources_dir, *extra: str):
    return load_config(None, [f"storage.root={root}", f"rag.sources=[{{name: facts, uri: '{sources_dir}'}}]",
                              "rag.passage_words=12", "rag.overlap_words=3", *extra])


@pytest.fixture
def facts_dir(tmp_path):
    folder = tmp_path / "facts"
    folder.mkdir()
    for name, text in FACTS.items():
        (folder / name).write_text(text)
    return folder


def test_passages_are_overlapping_word_windows():
    words = " ".join(f"w{i}" for i in range(25))
    parts = cut_passages(words, 10, 3)
    assert parts[0].split() == [f"w{i}" for i in range(10)]
    assert parts[1].split()[:3] == ["w7", "w8", "w9"]  # three words shared
    assert parts[-1].split()[-1] == "w24" and all(len(p.split()) <= 10 for p in parts)
    assert cut_passages("short text", 10, 3) == ["short text"] and cut_passages("   ", 10, 3) == []


def test_index_finds_the_document_on_a_folder_and_on_s3(store_root, facts_dir):
    cfg = rag_cfg(store_root.uri, facts_dir)
    manifest = build_index(cfg, store_root.store, log=lambda _: None)
    assert manifest["documents"] == 4 and manifest["passages"] >= 4
    index = RagIndex.load(store_root.store, cfg.rag_uri)
    hits = index.search("What is the capital of Zembla?", 3)
    assert hits[0]["source"] == "facts" and "Quixotl" in hits[0]["text"] and "zembla.txt" in hits[0]["doc"]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert "orbis.txt" in index.search("lanterns librarians", 1)[0]["doc"]
    assert index.search("xyzzy plugh", 3) == [] and index.search("the of is", 3) == []  # stopwords only


def test_missing_or_foreign_index_is_a_clear_error(tmp_path):
    from lm.storage import ObjectStore

    store = ObjectStore(load_config(None, [f"storage.root={tmp_path}"]).storage)
    with pytest.raises(RagError, match=r"no retrieval index at .*lm rag build"):
        RagIndex.load(store, str(tmp_path / "nowhere"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "something/9"}))
    with pytest.raises(RagError, match="format 'something/9'"):
        RagIndex.load(store, str(tmp_path / "other"))


def test_augment_keeps_the_best_passages_that_fit():
    hits = [{"text": "alpha " * 5}, {"text": "beta " * 5}, {"text": "gamma " * 50}]
    template = "Context:\n{context}\n\n{prompt}"
    prompt, used = augment(template, "Q?", hits, lambda text: len(text.split()) <= 20)
    assert used == hits[:2] and prompt.startswith("Context:\n[1] alpha") and "[2] beta" in prompt
    assert prompt.endswith("\n\nQ?") and "gamma" not in prompt
    assert augment(template, "Q?", hits, lambda text: False) == ("Q?", [])


def test_rag_config_and_cli_errors(tmp_path, facts_dir, capsys):
    with pytest.raises(ConfigError, match="overlap_words"):
        load_config(None, ["rag.passage_words=10", "rag.overlap_words=10"])
    with pytest.raises(ConfigError, match=r"\{context\} and \{prompt\}"):
        load_config(None, ["rag.template=Only {prompt}"])
    assert lm_main(["rag", "build", f"storage.root={tmp_path}"]) == 2
    assert "rag.sources is empty" in capsys.readouterr().err
    assert lm_main(["rag", "search", "crown", f"storage.root={tmp_path}"]) == 2
    assert "lm rag build" in capsys.readouterr().err
    args = [f"storage.root={tmp_path}", f"rag.sources=[{{name: facts, uri: '{facts_dir}'}}]"]
    assert lm_main(["rag", "build", *args]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["documents"] == 4
    assert lm_main(["rag", "search", "amber glass", "--top-k", "1", *args]) == 0
    assert "Zembla exports amber" in capsys.readouterr().out


def test_embeddings_are_unit_mean_pooled_and_padding_free(small_tokenizer, small_model):
    model = small_model(small_tokenizer)
    ids = [small_tokenizer.encode(t) for t in ("ROMEO: good night", "KING:", "ROMEO: good night")]
    together = np.array(embed_ids(model, ids))
    alone = np.array([embed_ids(model, [row])[0] for row in ids])
    assert together.shape == (3, 32) and np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    assert np.allclose(together, alone, atol=1e-5)  # right padding in a batch changes nothing
    assert np.allclose(together[0], together[2]) and not np.allclose(together[0], together[1])
    x = torch.tensor([ids[0]])
    hidden = model.hidden_states(x)
    assert torch.allclose(model.lm_head(hidden).float(), model(x)[0], atol=1e-5)  # what forward reads
    mean = torch.nn.functional.normalize(hidden.mean(1), dim=-1)[0]
    assert np.allclose(together[0], mean.detach().numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        embed_ids(model, [[]])


def test_named_prompt_templates():
    templates = {"qa": "Question: {prompt}\nAnswer in the style of {author}:"}
    assert (schemas.apply_template(templates, "qa", "Why?", {"author": "Marlowe"})
            == "Question: Why?\nAnswer in the style of Marlowe:")
    with pytest.raises(ValueError, match="template 'nope' does not exist"):
        schemas.apply_template(templates, "nope", "Why?", {})
    with pytest.raises(ValueError, match=r"needs template_vars \['author'\]"):
        schemas.apply_template(templates, "qa", "Why?", {})
    with pytest.raises(ValueError, match=r"has no fields \['mood'\]"):
        schemas.apply_template(templates, "qa", "Why?", {"author": "x", "mood": "y"})
    with pytest.raises(ConfigError, match=r"has no \{prompt\} field"):
        load_config(None, ["serve.templates={bad: 'no fields'}"])
    with pytest.raises(ConfigError, match="plain names"):
        load_config(None, ["serve.templates={bad: '{prompt} {a.b}'}"])


def test_embedding_request_shapes():
    req = schemas.EmbeddingRequest(model="m", input="one")
    assert req.inputs() == ["one"]
    assert schemas.EmbeddingRequest(model="m", input=[1, 2, 3]).inputs() == [[1, 2, 3]]
    assert schemas.EmbeddingRequest(model="m", input=[[1], [2, 3]]).inputs() == [[1], [2, 3]]
    body = schemas.embedding_response("m", [[0.5, -1.0]], "base64", 3)
    import base64

    assert np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4").tolist() == [0.5, -1.0]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
