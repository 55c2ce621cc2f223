"""Task discovery: seeded clustering, named clusters, and a classifier that routes code and chat apart."""

import numpy as np
import pytest

from specrouter.core.model import load_hf_model
from specrouter.routing.classifier import classify, classify_request
from specrouter.tasks import corpora
from specrouter.tasks.classifier import TaskClassifier
from specrouter.tasks.discovery import TaskModel, fit_tasks, routing_accuracy
from specrouter.tasks.encoders import HiddenStateEncoder


def blobs(seed: int) -> tuple[np.ndarray, list[str]]:
    """Three separated groups in 16 dimensions: two of source "a", one of source "b"."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16)) * 4
    sizes, labels = (30, 20, 25), ["a", "a", "b"]
    vectors = np.concatenate([centres[i] + rng.normal(size=(n, 16)) for i, n in enumerate(sizes)])
    return vectors.astype(np.float32), [labels[i] for i, n in enumerate(sizes) for _ in range(n)]


def test_clustering_is_deterministic_under_a_seed():
    vectors, sources = blobs(0)
    first = fit_tasks(vectors, sources, "test", "hash", seed=3)
    second = fit_tasks(vectors, sources, "test", "hash", seed=3)
    assert np.array_equal(first.centroids, second.centroids)
    assert first.names == second.names and first.silhouette == second.silhouette


def test_silhouette_picks_the_number_of_groups_and_names_them_by_source():
    vectors, sources = blobs(1)
    model = fit_tasks(vectors, sources, "test", "hash", k_range=(2, 3, 4, 5), seed=0)
    assert model.k == 3
    assert model.names == ("a", "b", "a-2")  # larger first; a second "a" cluster gets a suffix
    assert model.sources == ("a", "b", "a")
    assert max(model.silhouette, key=model.silhouette.get) == 3
    assert routing_accuracy(model, vectors, sources) == 1.0


def test_a_task_model_saved_and_loaded_routes_the_same(tmp_path):
    vectors, sources = blobs(2)
    model = fit_tasks(vectors, sources, "test", "hash", seed=0)
    model.save(tmp_path, "m")
    loaded = TaskModel.load(tmp_path, "m")
    assert loaded.names == model.names and loaded.silhouette == model.silhouette
    assert loaded.nearest(vectors) == model.nearest(vectors)


@pytest.fixture(scope="module")
def smollm2_encoder(smollm2_dir):
    model, tokenizer = load_hf_model(str(smollm2_dir), "float32")
    return HiddenStateEncoder(model, tokenizer, "smollm2-135m", max_tokens=48)


@pytest.fixture(scope="module")
def code_chat(smollm2_encoder):
    """A task model fitted on the training corpus, and held-out evaluation prompts of both sources."""
    train = corpora.training_corpus(16)
    held_out = corpora.humaneval()[:10] + corpora.sharegpt_evaluation()[:10]
    corpora.assert_disjoint(train, held_out)
    vectors = smollm2_encoder.encode([t.text for t in train])
    model = fit_tasks(vectors, [t.source for t in train], smollm2_encoder.name, corpora.corpus_sha256(train),
                      k_range=(2, 3), seed=0)
    return TaskClassifier(model, smollm2_encoder), held_out


def test_classifier_routes_held_out_code_and_chat_prompts_apart(code_chat, smollm2_encoder):
    classifier, held_out = code_chat
    matches = [classifier.classify(t.text) for t in held_out]
    routed = [m.task for m in matches]
    accuracy = sum(classifier.model.source_of(r) == t.source for r, t in zip(routed, held_out)) / len(held_out)
    assert accuracy >= 0.9, list(zip(routed, [t.source for t in held_out]))
    assert all(m.ms > 0 and 0.0 <= m.distance <= 2.0 for m in matches)
    # the distance is to the centroid of the task named: no other centroid is nearer
    vectors = classifier.model.project(classifier.encoder.encode([held_out[0].text]))[0]
    distances = np.linalg.norm(classifier.model.centroids - vectors, axis=1)
    assert matches[0].distance == pytest.approx(distances.min(), rel=1e-4)
    assert classifier.model.names[int(distances.argmin())] == matches[0].task
    with pytest.raises(ValueError):
        TaskClassifier(classifier.model, HiddenStateEncoder(smollm2_encoder.model, smollm2_encoder.tokenizer, "other"))


def test_an_explicit_class_wins_and_the_lexical_class_is_the_fallback(code_chat):
    classifier, held_out = code_chat
    code = held_out[0].text
    discovered = classifier.classify(code).task
    assert classify_request(code, "chat-2", discovered) == "chat-2"
    assert classify_request(code, None, discovered) == discovered
    assert classify_request(code, None, None) == classify(code) == "code"
