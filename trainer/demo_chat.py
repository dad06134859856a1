"""The built-in conversation set about the demo stories, and the checker that scores answers.

    python -m trainer.demo qa --n 5 --seed 123     # {"story", "question", "answer"} lines, fresh for any seed

Conversations come from a seeded ``random.Random`` over the vocabulary of trainer/demo.py, with no
download: a short story in the user's turn followed by a question about it (who, what animal, where,
what, who helped, where to, how it ended, what happened after ...), answered in one short sentence;
follow-up questions in later turns, which need the story (and for "what happened next?" the previous
answer) from earlier turns; requests for a story about a character, an animal or a place, answered
with a story from the demo grammar; greetings and small talk.

The stories asked about are short (five sentences) and built from a fixed plan, so every question has
exactly one fact for an answer: the intro names the hero, the animal and the home; three events in a
random order (finding an object, going somewhere, asking a friend for help) and an ending with a
feeling. Every answer sentence is one the checker accepts: the demo grammar's own sentences, plus a
few answer forms (:data:`ANSWER_GRAMMAR`). Answers repeat the story's own words around the fact ("Tom
lived in the forest." for "... named Tom who lived in the forest."): a two-layer model answers by
finding the same words in the story and copying what follows them.

:func:`score` judges a reply against an item: *correct* when the reply's first sentence, minus the
question's words, holds the fact and no other word of the fact's kind (another place, another name);
*grammatical* when every complete sentence of it is one the checker accepts.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

from trainer import demo

# The answer forms that are not story sentences; nonterminals are the demo grammar's.
ANSWER_GRAMMAR: dict[str, list[list[str]]] = dict(demo.GRAMMAR) | {
    "<reply>": [["<sentence>"], ["<answer>"]],
    "<answer>": [s.split() for s in (
        "the story is about <hero> .", "<hero> is the <animal> .", "<hero> is <a_animal> .",
        "<hero> lived in <place> .",
        "<friend> helped <hero> .", "hello !", "hi !", "do you want to hear a story ?",
        "i am fine , thank you !", "i am a little model that knows many stories .", "goodbye !",
        "you are welcome !", "here is a story .", "i like stories about <place_noun> .")],
}
for _alts in ANSWER_GRAMMAR.values():  # typos in the added rules fail at import, as in demo.py
    for _alt in _alts:
        for _sym in _alt:
            assert not _sym.startswith("<") or _sym in ANSWER_GRAMMAR, _sym

_WORD = re.compile(r"[A-Za-z]+")
_FIRST_TIMES = ("one day", "on sunday", "at noon")
_LATER_TIMES = ("then", "later", "after that", "soon", "a little later", "the next morning", "in the evening")
_CATEGORIES = {"name": demo.HEROES_HE + demo.HEROES_SHE, "animal": demo.ANIMALS, "place": demo.PLACES,
               "object": demo.OBJECTS, "emotion": demo.EMOTIONS}


@dataclass
class Story:
    text: str
    hero: str
    pron: str
    animal: str
    home: str
    obj: str
    verb: tuple[str, str]  # (past, base) of what the hero did with the object
    dest: str
    moved: str
    friend: str
    emotion: str
    order: list[str] = field(default_factory=list)  # the events in story order: "find", "move", "help"


@dataclass
class QA:
    """One question about a story: its kind, the fact that answers it (and the fact's category), the
    reference answer sentence."""
    kind: str
    question: str
    fact: str
    category: str
    reply: str


def _sentence(text: str) -> str:
    text = re.sub(r" ([.,!?])", r"\1", text)
    return text[:1].upper() + text[1:]


def make_story(rng: random.Random) -> Story:
    he = rng.random() < 0.5
    hero = rng.choice(demo.HEROES_HE if he else demo.HEROES_SHE)
    friend = rng.choice([n for n in demo.HEROES_HE + demo.HEROES_SHE if n != hero])
    home, dest = rng.sample(demo.PLACES, 2)
    s = Story(text="", hero=hero, pron="he" if he else "she", animal=rng.choice(demo.ANIMALS), home=home,
              obj=rng.choice(demo.OBJECTS), verb=rng.choice(demo.VERBS), dest=dest, moved=rng.choice(demo.MOVES),
              friend=friend, emotion=rng.choice(demo.EMOTIONS))
    # finding comes before the help with the object; going somewhere can come anywhere
    s.order = rng.choice((["find", "help", "move"], ["find", "move", "help"], ["move", "find", "help"]))
    adj = rng.choice(demo.ADJECTIVES)
    parts = [f"once upon a time , there was {demo._article(adj)} {adj} {s.animal} named {hero} who lived in the {home} ."]
    times = [rng.choice(_FIRST_TIMES)] + rng.sample(_LATER_TIMES, 2)
    verb2 = rng.choice(demo.VERBS)[0]
    for when, event in zip(times, s.order):
        if event == "find":
            parts.append(f"{when} , {hero} {s.verb[0]} {demo._article(s.obj)} {s.obj} .")
        elif event == "move":
            parts.append(f"{when} , {hero} {s.moved} to the {dest} .")
        else:  # the demo grammar's <together> has no time in this form
            parts.append(f"{hero} asked {friend} for help , and they {verb2} the {s.obj} together .")
    parts.append(f"in the end , {hero} was {s.emotion} .")
    s.text = " ".join(_sentence(p) for p in parts)
    return s


def _event_answer(s: Story, event: str) -> QA:
    if event == "find":
        return QA("after", "", s.obj, "object", _sentence(f"{s.hero} {s.verb[0]} {demo._article(s.obj)} {s.obj} ."))
    if event == "move":
        return QA("after", "", s.dest, "place", _sentence(f"{s.hero} {s.moved} to the {s.dest} ."))
    if event == "help":
        return QA("after", "", s.friend, "name", _sentence(f"{s.friend} helped {s.hero} ."))
    return QA("after", "", s.emotion, "emotion", _sentence(f"in the end , {s.hero} was {s.emotion} ."))


def _event_phrase(s: Story, event: str) -> str:
    return {"find": f"{s.verb[0]} {demo._article(s.obj)} {s.obj}", "move": f"{s.moved} to the {s.dest}",
            "help": f"asked {s.friend} for help"}[event]


def questions(s: Story) -> list[QA]:
    """Every question the story answers, one per kind (one "after" question per event)."""
    h = s.hero
    out = [
        QA("who", "Who is the story about?", h, "name", f"The story is about {h}."),
        # "the": "a" or "an" would be chosen before the animal is copied, a guess a small model gets wrong
        QA("animal", f"What animal is {h}?", s.animal, "animal", f"{h} is the {s.animal}."),
        QA("home", f"Where did {h} live?", s.home, "place", f"{h} lived in the {s.home}."),
        QA("what", f"What did {h} {s.verb[1]}?", s.obj, "object",
           _sentence(f"{h} {s.verb[0]} {demo._article(s.obj)} {s.obj} .")),
        QA("helper", f"Who helped {h}?", s.friend, "name", f"{s.friend} helped {h}."),
        QA("where", f"Where did {h} go?", s.dest, "place", f"{h} {s.moved} to the {s.dest}."),
        QA("feeling", f"How did {h} feel in the end?", s.emotion, "emotion", f"In the end, {h} was {s.emotion}."),
    ]
    for i, event in enumerate(s.order):
        nxt = _event_answer(s, s.order[i + 1] if i + 1 < len(s.order) else "end")
        nxt.question = f"What happened after {h} {_event_phrase(s, event)}?"
        out.append(nxt)
    return out


def prompt(story: str, question: str) -> str:
    """The user's turn that asks about a story: the story, then the question."""
    return f"{story} {question}"


# ---- conversations ------------------------------------------------------------------------------

def _story_request(rng: random.Random) -> tuple[str, str, str]:
    """(request, story text, hero): a story from the demo grammar about a named thing."""
    cast = demo.story_cast(rng)
    hero, animal = cast["<hero>"][0][0], cast["<animal>"][0][0]
    topic = rng.choice(("hero", "animal", "place"))
    if topic == "hero":
        request = f"Tell me a story about {hero}."
    elif topic == "animal":
        request = f"Tell me a story about {demo._article(animal)} {animal}."
    else:
        place = rng.choice(demo.PLACES)
        cast["<place>"] = [["the", place]]
        request = f"Tell me a story about the {place}."
    sentences = [demo._sentence("<intro>", rng, cast)]
    for _ in range(rng.randint(2, 3)):
        sentences.append(demo._sentence(rng.choice(demo._BODY), rng, cast))
    sentences.append(demo._sentence("<ending>", rng, cast))
    return request, " ".join(sentences), hero


SMALL_TALK = (("Hello!", "Hello! Do you want to hear a story?"), ("Hi!", "Hi! Do you want to hear a story?"),
              ("How are you?", "I am fine, thank you!"), ("Who are you?", "I am a little model that knows many stories."),
              ("Thank you!", "You are welcome!"), ("Bye!", "Goodbye!"), ("Goodbye.", "Goodbye!"))


def _qa_conversation(rng: random.Random) -> list[dict]:
    s = make_story(rng)
    qs = questions(s)
    rng.shuffle(qs)
    first = qs[0]
    msgs = [{"role": "user", "content": prompt(s.text, first.question)},
            {"role": "assistant", "content": first.reply}]
    last_event = {"find": "find", "move": "move", "helper": "help"}.get(first.kind)
    for q in qs[1:1 + rng.choice((1, 2, 3, 4))]:  # follow-ups: more practice finding facts per story
        if last_event is not None and rng.random() < 0.4:
            # "what happened next?" means the event after the one in the previous answer
            i = s.order.index(last_event)
            q = _event_answer(s, s.order[i + 1] if i + 1 < len(s.order) else "end")
            q.question = "What happened next?"
        msgs += [{"role": "user", "content": q.question}, {"role": "assistant", "content": q.reply}]
        last_event = {"find": "find", "move": "move", "helper": "help"}.get(q.kind)
    return msgs


def _story_conversation(rng: random.Random) -> list[dict]:
    msgs = []
    if rng.random() < 0.3:
        hello, answer = SMALL_TALK[rng.randrange(2)]
        msgs += [{"role": "user", "content": hello}, {"role": "assistant", "content": answer}]
    request, story, hero = _story_request(rng)
    msgs += [{"role": "user", "content": request}, {"role": "assistant", "content": story}]
    if rng.random() < 0.3:  # a question about the story the assistant told: it is in an earlier turn
        msgs += [{"role": "user", "content": "Who is the story about?"},
                 {"role": "assistant", "content": f"The story is about {hero}."}]
    return msgs


def _small_talk(rng: random.Random) -> list[dict]:
    msgs = []
    for hello, answer in rng.sample(SMALL_TALK, rng.randint(1, 2)):
        msgs += [{"role": "user", "content": hello}, {"role": "assistant", "content": answer}]
    return msgs


N_CONVERSATIONS = 12_000  # the size of the built-in set the chat stage reads (chat_data.read_conversations)


def conversations(seed: int, n: int) -> list[list[dict]]:
    """``n`` conversations (lists of messages), the same for the same seed: 80% questions about a
    story, 12% story requests, 8% small talk."""
    rng = random.Random(f"demo-chat:{seed}")
    out = []
    for _ in range(n):
        r = rng.random()
        out.append(_qa_conversation(rng) if r < 0.8 else _story_conversation(rng) if r < 0.92 else _small_talk(rng))
    return out


# ---- questions for measuring, and the checker ---------------------------------------------------

@dataclass
class Item:
    story: str
    question: str
    answer: str  # the fact: one word or name
    kind: str
    category: str
    reply: str  # the reference answer sentence

    def public(self) -> dict:
        return {"story": self.story, "question": self.question, "answer": self.answer}


def qa_items(n: int, seed: int) -> list[Item]:
    """``n`` fresh story questions for ``seed``: one story each, every kind of question equally likely
    (who, animal, home, what, helper, where, feeling, after)."""
    rng = random.Random(f"demo-qa:{seed}")
    items = []
    for _ in range(n):
        s = make_story(rng)
        qs = questions(s)
        kind = rng.choice(sorted({q.kind for q in qs}))
        q = rng.choice([q for q in qs if q.kind == kind])
        items.append(Item(s.text, q.question, q.fact, q.kind, q.category, q.reply))
    return items


def check_reply_sentence(sentence: str) -> bool:
    """True when ``sentence`` is a demo story sentence or one of the answer forms."""
    if demo.check_sentence(sentence):
        return True
    sentence = sentence.strip()
    words = demo._TOKEN.findall(sentence)
    if not words or _sentence(" ".join(words)) != sentence:
        return False
    if words[0] not in _NAMES:  # the capital on the first word is rendering, as in demo.check_sentence
        words[0] = words[0].lower()
    return _parse("<answer>", tuple(words))


_NAMES = frozenset(_CATEGORIES["name"])


def _parse(start: str, words: tuple[str, ...]) -> bool:
    @lru_cache(maxsize=None)
    def ends(symbol: str, pos: int) -> frozenset[int]:
        if not symbol.startswith("<"):
            return frozenset([pos + 1]) if pos < len(words) and words[pos] == symbol else frozenset()
        result: set[int] = set()
        for alt in ANSWER_GRAMMAR[symbol]:
            positions = {pos}
            for sym in alt:
                positions = {e for p in positions for e in ends(sym, p)}
                if not positions:
                    break
            result |= positions
        return frozenset(result)

    return len(words) in ends(start, 0)


def split_reply(text: str) -> list[str]:
    return [s.strip() for s in re.findall(r"[^.!?]*[.!?]", text) if s.strip()]


def score(reply: str, item: Item) -> tuple[bool, bool]:
    """(correct, grammatical) for a model's ``reply`` to ``item``."""
    sentences = split_reply(reply)
    grammatical = bool(sentences) and all(check_reply_sentence(s) for s in sentences)
    if not sentences:
        return False, grammatical
    asked = {w.lower() for w in _WORD.findall(item.question)}
    said = [w.lower() for w in _WORD.findall(sentences[0]) if w.lower() not in asked]
    kind_words = {w.lower() for w in _CATEGORIES[item.category]}
    found = {w for w in said if w in kind_words}
    return found == {item.answer.lower()}, grammatical


def iter_qa_lines(n: int, seed: int) -> Iterator[str]:
    for item in qa_items(n, seed):
        yield json.dumps(item.public(), ensure_ascii=False)


def main_qa(argv: list[str] | None = None) -> None:
    import argparse
    p = argparse.ArgumentParser(prog="python -m trainer.demo qa",
                                description="Print fresh questions about demo stories as JSON lines.")
    p.add_argument("--n", type=int, default=10, help="how many questions")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n < 0:
        p.error("--n must not be negative")
    for line in iter_qa_lines(args.n, args.seed):
        print(line)
