"""The built-in demo corpus: short stories from a small grammar of our own, and a checker for it.

    python -m trainer.demo out.txt --bytes 2000000 --seed 0
    python -m trainer.demo qa --n 5 --seed 1      # fresh story questions (trainer/demo_chat.py)

The grammar is data (GRAMMAR below): nonterminals in <angle brackets> map to alternatives, each a
sequence of words and nonterminals. Stories are generated from it with a seeded random.Random, and
:func:`check_sentence` parses a sentence against the same data with a memoised recursive-descent
matcher, so "the model writes grammatical sentences" is something we can measure (:func:`coherence`).

Within a story the generator keeps the cast fixed (hero, friend, the hero's animal and pronoun) and
draws every place from two of its own, the hero's home the likelier (:func:`story_cast`), as a story
a child tells stays in a place or two. A model then learns that a story's places are the ones it
already named, which answering "where?" about a story needs: with a new place at every mention, a
depth-2 model never learned to copy a place (it answered "where?" with one it liked, 4-10% right),
with two places a story and a place in most sentences it copies them within 1,500 steps. The checker
accepts any cast, since it judges one sentence at a time.
Stories are separated by a blank line. About 300 distinct words: enough variety to be worth learning,
small enough for a depth-2..4 model on a CPU in minutes.
"""

from __future__ import annotations

import argparse
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from trainer.sizing import DEMO_CORPUS_BYTES

HEROES_HE = ("Tom", "Ben", "Sam", "Leo", "Max", "Jack", "Finn", "Noah", "Oscar", "Hugo", "Theo", "Felix",
             "Omar", "Ravi", "Kenji", "Luca")
HEROES_SHE = ("Mia", "Lily", "Anna", "Zoe", "Emma", "Ruby", "Ella", "Nora", "Maya", "Rosa", "Ivy", "Lucy",
              "Amara", "Sofia", "Hana", "Chloe")
ANIMALS = ("fox", "rabbit", "bear", "cat", "dog", "mouse", "duck", "frog", "owl", "squirrel", "turtle",
           "pig", "goat", "lion", "tiger", "horse", "hedgehog", "bird", "otter", "elephant", "puppy", "kitten")
ADJECTIVES = ("little", "big", "happy", "brave", "kind", "shy", "clever", "funny", "old", "young", "tiny",
              "gentle", "curious", "quiet", "busy", "sleepy", "silly", "proud", "friendly", "small",
              "red", "blue", "green", "yellow", "shiny", "soft", "heavy", "new", "bright", "fast")
PLACES = ("forest", "garden", "park", "village", "castle", "meadow", "river", "farm", "town", "beach",
          "hill", "cave", "school", "library", "kitchen", "market", "pond", "valley", "house", "barn",
          "lake", "field", "playground", "bakery", "harbor")
OBJECTS = ("ball", "kite", "box", "hat", "book", "apple", "cake", "boat", "drum", "key", "map", "lamp",
           "basket", "flower", "shell", "stone", "cup", "blanket", "bell", "feather", "toy", "bike",
           "sandwich", "letter", "umbrella", "egg", "carrot", "picture", "rope", "coin", "wagon", "song")
# past tense (used after any subject) and the matching base form (after "wanted to" / "decided to")
VERBS = (("found", "find"), ("saw", "see"), ("lost", "lose"), ("carried", "carry"), ("painted", "paint"),
         ("dropped", "drop"), ("shared", "share"), ("hid", "hide"), ("fixed", "fix"), ("washed", "wash"),
         ("threw", "throw"), ("caught", "catch"), ("bought", "buy"), ("built", "build"), ("opened", "open"),
         ("picked up", "pick up"), ("looked for", "look for"), ("cleaned", "clean"), ("made", "make"),
         ("gave away", "give away"), ("borrowed", "borrow"), ("pulled", "pull"), ("chased", "chase"),
         ("wrapped", "wrap"), ("held", "hold"))
EMOTIONS = ("happy", "sad", "scared", "excited", "angry", "surprised", "tired", "proud", "worried", "calm",
            "lonely", "glad", "grumpy", "hungry", "curious", "thankful")
MOVES = ("walked", "ran", "hopped", "went", "hurried", "skipped", "rushed", "wandered", "climbed", "swam")
TIMES = ("one day", "the next morning", "after that", "later", "then", "in the evening", "soon",
         "at noon", "after lunch", "that night", "on sunday", "a little later", "before dinner", "suddenly")
PREPS = ("in", "near", "behind", "under", "next to", "across", "inside", "by", "around", "outside")
WEATHER = ("sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy", "foggy", "stormy", "bright")
SKIES = ("sky", "air", "weather", "wind", "morning", "day")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _alts(*alternatives: str) -> list[list[str]]:
    return [a.split() for a in alternatives]


def _build_grammar() -> dict[str, list[list[str]]]:
    # Every alternative is a space-separated sequence; "<x>" is a nonterminal, anything else a word.
    # Commas, full stops and "!" are words here; rendering glues them to the word before.
    g: dict[str, list[list[str]]] = {
        "<sentence>": _alts("<intro>", "<action>", "<feeling>", "<goal>", "<together>", "<weather>",
                            "<exclaim>", "<move>", "<ending>"),
        "<intro>": _alts("once upon a time , there was <a_adj> <animal> named <hero> who lived in <place> .",
                         "once upon a time , there was <a_animal> named <hero> .",
                         "there once was <a_adj> <animal> called <hero> who loved <a_obj> ."),
        "<action>": _alts("<time_opt> <subj> <verb> <obj> <where_opt> <because_opt> ."),
        "<feeling>": _alts("<subj> was <emotion> because <subj> <verb> <obj> .",
                           "<subj> felt <emotion> when <subj> <verb> <obj> <where_opt> .",
                           "<time_opt> <subj> was very <emotion> ."),
        "<goal>": _alts("<subj> wanted to <verb_base> <obj> , so <pron> <moved> to <place> .",
                        "<subj> decided to <verb_base> <obj> <where_opt> ."),
        "<together>": _alts("<time_opt> <hero> and <friend> <verb> <obj> <where_opt> together .",
                            "<hero> asked <friend> for help , and they <verb> <obj> together ."),
        "<weather>": _alts("<time_opt> the <sky> was <weather_adj> .",
                           "it was <a_weather> day in <place> ."),
        "<exclaim>": _alts("what <a_adj> day !", "<subj> said that it was <a_adj> <obj_noun> !"),
        "<move>": _alts("<time_opt> <subj> <moved> to <place> <because_opt> ."),
        "<ending>": _alts("in the end , <subj> was <emotion> .",
                          "from that day on , <hero> and <friend> were best friends .",
                          "and they all lived happily ever after ."),
        "<time_opt>": [[], ["<time>", ","]],
        "<where_opt>": [[], ["<prep>", "<place>"]],
        "<because_opt>": [[], ["because", "<reason>"]],
        "<reason>": _alts("<pron> wanted to <verb_base> <obj>", "it was <weather_adj>",
                          "<pron> felt <emotion>", "<friend> needed help", "<subj> was <emotion>"),
        "<subj>": _alts("<hero>", "<friend>", "<pron>", "the <animal>"),
        "<obj>": _alts("<a_obj>", "<a_adj> <obj_noun>", "<det> <obj_noun>", "<det> <adj> <obj_noun>"),
        "<det>": _alts("the", "his", "her", "their"),
        "<pron>": _alts("he", "she", "they"),
        "<place>": _alts("the <place_noun>", "the <adj> <place_noun>"),
        "<hero>": [[n] for n in HEROES_HE + HEROES_SHE],
        "<friend>": [[n] for n in HEROES_HE + HEROES_SHE],
        "<animal>": [[w] for w in ANIMALS],
        "<a_animal>": [[_article(w), w] for w in ANIMALS],
        "<adj>": [[w] for w in ADJECTIVES],
        "<a_adj>": [[_article(w), w] for w in ADJECTIVES],
        "<obj_noun>": [[w] for w in OBJECTS],
        "<a_obj>": [[_article(w), w] for w in OBJECTS],
        "<place_noun>": [[w] for w in PLACES],
        "<verb>": [past.split() for past, _ in VERBS],
        "<verb_base>": [base.split() for _, base in VERBS],
        "<emotion>": [[w] for w in EMOTIONS],
        "<moved>": [[w] for w in MOVES],
        "<time>": [t.split() for t in TIMES],
        "<prep>": [p.split() for p in PREPS],
        "<weather_adj>": [[w] for w in WEATHER],
        "<a_weather>": [[_article(w), w] for w in WEATHER],
        "<sky>": [[w] for w in SKIES],
    }
    for name, alternatives in g.items():  # catch typos in the grammar itself at import time
        for alt in alternatives:
            for sym in alt:
                if sym.startswith("<") and sym not in g:
                    raise AssertionError(f"{name} refers to undefined {sym}")
    return g


GRAMMAR = _build_grammar()
_BODY = ("<action>", "<action>", "<feeling>", "<goal>", "<together>", "<weather>", "<exclaim>", "<move>")
_TOKEN = re.compile(r"[A-Za-z]+|[.,!]|\S")


def _render(words: list[str]) -> str:
    text = " ".join(words)
    text = re.sub(r" ([.,!])", r"\1", text)
    return text[:1].upper() + text[1:]


Cast = dict[str, list[list[str]]]  # a nonterminal -> the story's own alternatives for it


def story_cast(rng: random.Random) -> Cast:
    """One story's cast, as alternatives that override the grammar's while the story is generated: a
    hero, a friend, the hero's animal and pronoun, and two places, the first (the hero's home) twice as
    likely as the other. Generation only: a story stays a sentence sequence the grammar accepts."""
    he = rng.random() < 0.5
    hero = rng.choice(HEROES_HE if he else HEROES_SHE)
    friend = rng.choice([f for f in HEROES_HE + HEROES_SHE if f != hero])
    animal = rng.choice(ANIMALS)
    home, away = rng.sample(PLACES, 2)
    return {"<hero>": [[hero]], "<friend>": [[friend]], "<animal>": [[animal]], "<pron>": [["he" if he else "she"]],
            "<place_noun>": [[home], [home], [away]],
            # places recur often enough to be worth copying: every action names one, mostly bare
            "<where_opt>": [["<prep>", "<place>"]],
            "<place>": [["the", "<place_noun>"], ["the", "<place_noun>"], ["the", "<adj>", "<place_noun>"]]}


def _expand(symbol: str, rng: random.Random, cast: Cast, out: list[str]) -> None:
    if not symbol.startswith("<"):
        out.append(symbol)
        return
    alternatives = cast.get(symbol, GRAMMAR[symbol])
    for sym in alternatives[0] if len(alternatives) == 1 else rng.choice(alternatives):
        _expand(sym, rng, cast, out)


def _sentence(start: str, rng: random.Random, cast: Cast) -> str:
    words: list[str] = []
    _expand(start, rng, cast, words)
    return _render(words)


def generate_stories(seed: int = 0, n: int | None = None) -> Iterator[str]:
    """Yield ``n`` stories (endless when None), the same ones for the same seed."""
    rng = random.Random(seed)
    count = 0
    while n is None or count < n:
        cast = story_cast(rng)
        sentences = [_sentence("<intro>", rng, cast)]
        for _ in range(rng.randint(3, 8)):
            sentences.append(_sentence(rng.choice(_BODY), rng, cast))
        sentences.append(_sentence("<ending>", rng, cast))
        yield " ".join(sentences)
        count += 1


def iter_corpus(n_bytes: int, seed: int = 0) -> Iterator[str]:
    """Stories until their UTF-8 size (plus a blank line between each) reaches ``n_bytes``."""
    total = 0
    for story in generate_stories(seed):
        if total >= n_bytes:
            return
        yield story
        total += len(story.encode()) + 2


def write_corpus(path: str | Path, n_bytes: int = DEMO_CORPUS_BYTES, seed: int = 0) -> Path:
    """Write about ``n_bytes`` of stories to ``path``, one blank line between stories."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for story in iter_corpus(n_bytes, seed):
            f.write(story)
            f.write("\n\n")
    return path


# ---- checking ----------------------------------------------------------------------------------

def _match(words: tuple[str, ...]) -> bool:
    @lru_cache(maxsize=None)
    def ends(symbol: str, pos: int) -> frozenset[int]:
        # every position where a parse of `symbol` starting at `pos` can end
        if not symbol.startswith("<"):
            return frozenset([pos + 1]) if pos < len(words) and words[pos] == symbol else frozenset()
        result: set[int] = set()
        for alt in GRAMMAR[symbol]:
            positions = {pos}
            for sym in alt:
                positions = {e for p in positions for e in ends(sym, p)}
                if not positions:
                    break
            result |= positions
        return frozenset(result)

    return len(words) in ends("<sentence>", 0)


def check_sentence(sentence: str) -> bool:
    """True when ``sentence`` is exactly one the grammar can produce, spacing and capital included."""
    sentence = sentence.strip()
    words = _TOKEN.findall(sentence)
    if not words or _render(words) != sentence or not sentence[0].isupper():
        return False
    # The capital on the first word is rendering; try the word as written (a name) and lowercased.
    first_lower = (words[0][:1].lower() + words[0][1:],)
    return _match(tuple(words)) or _match(first_lower + tuple(words[1:]))


def split_sentences(text: str) -> list[str]:
    """Complete sentences (ending in . ! or ?) in order; a trailing unfinished sentence is dropped."""
    return [s.strip() for s in re.findall(r"[^.!?]*[.!?]", text) if s.strip()]


def coherence(text: str) -> float:
    """Fraction of the complete sentences in ``text`` that the grammar accepts (0.0 when there are
    none). A trailing sentence without its full stop is ignored: a sample cut at max_tokens should not
    count against the model."""
    sentences = split_sentences(text)
    if not sentences:
        return 0.0
    return sum(check_sentence(s) for s in sentences) / len(sentences)


def main(argv: list[str] | None = None) -> None:
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["qa"]:  # python -m trainer.demo qa --n N --seed S: questions (trainer/demo_chat.py)
        from trainer import demo_chat
        return demo_chat.main_qa(argv[1:])
    parser = argparse.ArgumentParser(description="Write the demo story corpus.")
    parser.add_argument("path")
    parser.add_argument("--bytes", type=int, default=DEMO_CORPUS_BYTES, help="about this many bytes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_corpus(args.path, args.bytes, args.seed)


if __name__ == "__main__":
    main()
