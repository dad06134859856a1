"""The demo corpus: every generated sentence is in the grammar, non-sentences are not, output is
reproducible and varied, and coherence() scores text the way the trainer's samples will be scored."""

from __future__ import annotations

import random

import pytest

from trainer import demo

pytestmark = pytest.mark.trainer  # the trainer alone: never opens the store


def test_every_generated_sentence_passes_the_checker():
    for story in demo.generate_stories(seed=11, n=150):
        sentences = demo.split_sentences(story)
        assert len(sentences) >= 5
        for sentence in sentences:
            assert demo.check_sentence(sentence), sentence
        assert demo.coherence(story) == 1.0


def test_the_same_seed_gives_the_same_stories_and_another_seed_does_not():
    assert list(demo.generate_stories(seed=5, n=20)) == list(demo.generate_stories(seed=5, n=20))
    assert list(demo.generate_stories(seed=5, n=20)) != list(demo.generate_stories(seed=6, n=20))


def test_the_corpus_is_varied():
    sentences = [s for story in demo.generate_stories(seed=1, n=500) for s in demo.split_sentences(story)]
    words = {w.strip(".,!").lower() for s in sentences for w in s.split()}
    assert len(set(sentences)) > 0.7 * len(sentences)
    assert len(words) > 250
    openings = {s.split()[0] for s in sentences}
    assert len(openings) > 20


@pytest.mark.parametrize("sentence", [
    "Tom found a ball near the park.",
    "Once upon a time, there was a little fox named Mia who lived in the forest.",
    "The next morning, she was very happy.",
    "From that day on, Tom and Mia were best friends.",
    "What a happy day!",
    "It was a sunny day in the town.",
])
def test_hand_written_grammatical_sentences_pass(sentence):
    assert demo.check_sentence(sentence)


@pytest.mark.parametrize("sentence", [
    "Tom fonud a ball near the park.",  # misspelt verb
    "Tom found a bal near the park.",  # misspelt noun
    "Ball a found Tom.",  # shuffled
    "Tom the ball found.",  # wrong word order
    "Tom found an ball.",  # wrong article
    "Tom found a ball near the park",  # no full stop
    "tom found a ball.",  # a name without its capital
    "Tom found a ball near.",  # a preposition with no place
    "Tom  found a ball.",  # two spaces: not how the corpus is written
    "Tom found a ball , near the park.",  # stray comma
    "The elephant computed an integral.",  # words outside the vocabulary
    "",
])
def test_non_sentences_fail(sentence):
    assert not demo.check_sentence(sentence)


def test_shuffling_the_words_of_real_sentences_breaks_them():
    rng = random.Random(0)
    failed = total = 0
    for story in demo.generate_stories(seed=2, n=40):
        for sentence in demo.split_sentences(story):
            words = sentence[:-1].split()
            if len(set(words)) < 5:
                continue
            rng.shuffle(words)
            total += 1
            failed += not demo.check_sentence(" ".join(words) + ".")
    assert total > 100 and failed / total > 0.97


def test_coherence_ignores_a_trailing_unfinished_sentence():
    text = "Tom found a ball. Mia was very sad. Then, the fox"
    assert demo.split_sentences(text) == ["Tom found a ball.", "Mia was very sad."]
    assert demo.coherence(text) == 1.0
    assert demo.coherence("Tom found a ball. Ball the sad. Mia was very sad. Fonud it.") == 0.5
    assert demo.coherence("no sentence ends here") == 0.0


def test_write_corpus_writes_about_the_requested_size(tmp_path):
    path = demo.write_corpus(tmp_path / "demo.txt", n_bytes=50_000, seed=3)
    data = path.read_text(encoding="utf-8")
    assert 50_000 <= len(data.encode()) < 52_000
    stories = [s for s in data.split("\n\n") if s]
    assert stories == list(demo.generate_stories(seed=3, n=len(stories)))
