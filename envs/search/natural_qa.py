"""Natural and two-hop questions over the wiki10k corpus (issue 18, points 1 and 2).

The generated benchmark of `envs.search.qa_data` (cloze sentences, description -> title)
teaches an agent to name the article it retrieved.  This module asks what people ask:
facts stated in a passage ("Who wrote Moby-Dick?", "What is the capital of Norway?",
"In which year was the BBC established?"), and two-hop questions through a bridge entity
("What nationality was the author of Moby-Dick?": hop 1 reads the author from the novel's
passage, hop 2 reads the author's nationality from the author's own passage).

Facts are extracted with patterns over the sentences of each passage, favouring precision
over recall (a wrong gold answer poisons RL):

* the sentence must be about the article: the lead's first sentence, or one that starts
  with the title, its last word (a surname), or "It/He/She/The <noun>";
* an entity answer is a whole capitalised name (connectors such as "de", "of", "von"
  allowed inside) that ends cleanly (punctuation or a function word follows, never a
  lower-case noun: "founded by Spanish colonists" is no founder);
* a number answer is the only one of its kind in the sentence ("population of 4.3 million");
* every answer is a span of the passage, 1-4 words, differs from the title and is not
  named by the question.

Two-hop questions compose a hop-1 fact of article A whose answer is the title of another
article B with a hop-2 fact of B.  They are kept only when both passages are in the corpus,
the final answer is a span of B and does not occur in A's passage, B's passage does not
name A (else one search aimed at B through A's name answers it: "the population of the
country whose capital is Oslo" finds Norway's "Its capital is Oslo"), and the question names
neither B nor the answer.

Splits are by article: articles linked by a two-hop question are grouped (union-find,
groups capped in size) and whole groups go to train/dev/test, so no article behind a test
question (either hop) is behind a train or dev question.

Each row's `metadata` has `qtype` ("natural" | "twohop"), `relation` ("author",
"author>nationality", ...), `titles` (the articles behind the question, hop order),
`subject`, `bridge` (two-hop) and `queries`: the searches an oracle issues
(`envs.search.oracle`): the subject for single-hop, the subject then the bridge entity
for two-hop.

    python -m envs.search.qa_data generate --out data/wiki10k_nq --types natural,twohop
    python -m envs.search.natural_qa report --data data/wiki10k_nq    # per-type counts + BM25 bounds
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from eval.qa_metrics import normalize_answer

__all__ = [
    "NATURAL_TYPES",
    "LEGACY_TYPES",
    "Fact",
    "subject_name",
    "extract_facts",
    "natural_candidates",
    "twohop_candidates",
    "split_articles_grouped",
    "choose_queries",
    "generate_natural_qa",
    "type_report",
    "main",
]

NATURAL_TYPES = ("natural", "twohop")
LEGACY_TYPES = ("desc2title", "title2desc", "cloze", "bridge")
DEFAULT_NATURAL_MIX = {"natural": 0.7, "twohop": 0.3}

# ---------------------------------------------------------------------------
# text helpers
# ---------------------------------------------------------------------------

_CONNECT = r"(?:de|da|del|della|di|do|dos|du|la|le|van|von|der|den|al|el|bin|ibn|of|y|and)"
_CAP = r"[A-Z\u00c0-\u00de][\w'\u2019\u02bc.\u00b7-]*"
# a name: capitalised words, connectors only between two of them ("Bay of Bengal", "Taejo of Joseon")
NAME = rf"{_CAP}(?: (?:{_CONNECT} )*{_CAP})*"
# what may follow an entity answer: punctuation/end, or a function word; never a lower-case noun
_CLEAN_END = re.compile(
    r"^(?:$|[,.;:)!?]|\s(?:\(|and|in|on|at|as|who|which|with|to|from|for|during|between|after|before|until|"
    r"near|by|under|but|while|when|where|since|along|about|around|is|was|were|has|had|it|he|she)\b)"
)
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_YEAR = r"1[0-9]{3}|20[0-2][0-9]"
_MONTHS = {"January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"}  # fmt: skip
# capitalised words that start a name-shaped span but are not names
_NOT_NAMES = {"The", "A", "An", "In", "On", "At", "His", "Her", "Its", "Their", "This", "That", "These", "It", "He",
              "She", "They", "After", "Before", "During", "Ancient", "Early", "Late", "Modern", "Northern", "Southern",
              "Eastern", "Western", "Central", "Saint"} | _MONTHS  # fmt: skip
_SENT_SUBJ_NOUN = (r"(?:city|town|country|nation|state|company|corporation|university|organization|organisation|"
                   r"film|novel|book|play|poem|river|lake|mountain|island|building|empire|kingdom|magazine|"
                   r"newspaper|band|group|element|metal|party|church|museum|bridge|capital|region|province|"
                   r"agency|dynasty|game|series|school|institute|league|club|team|mountain range|volcano|"
                   r"sea|bay|peninsula|territory|republic|municipality|airport|station|tower|temple|palace|"
                   r"cathedral|canal|desert|forest|park|festival|prize|award|foundation|society|academy)")  # fmt: skip
# nationality adjectives: capitalised words with a demonym ending (checked against the words that follow)
_DEMONYM = re.compile(r"^(?:[A-Z][a-z]+-)?[A-Z][a-z]+(?:an|ian|ean|ish|ese|ch|sh|ic|i|ss|ek|ot|ai|er)$")
_NOT_DEMONYM = {"Ancient", "Roman Catholic", "Christian", "Muslim", "Jewish", "Catholic", "Protestant", "Islamic",
                "Buddhist", "Hindu", "Classical", "Medieval", "Renaissance", "Baroque", "Romantic", "Gothic",
                "Academic", "Olympic", "Republican", "Democratic", "Socialist", "Marxist", "Communist", "Stoic",
                "Platonic", "Sufi", "Shia", "Sunni", "Orthodox", "Anglican", "Lutheran", "Calvinist", "Puritan",
                "Victorian", "Georgian", "Elizabethan", "Edwardian", "Napoleonic", "Biblical", "Vedic", "Pre",
                "Hellenistic", "Byzantine", "Abbasid", "Umayyad", "Ottoman", "Mughal", "Soviet", "Confederate",
                "Holy", "Grand", "Great", "Supreme", "Chief", "Nobel", "Academy", "Grammy", "Oscar", "Emmy",
                "Tony", "Pulitzer", "Premier", "Major", "Super", "High", "Old", "New", "Major League"}  # fmt: skip
_WORK_KIND = r"(?:novel|novella|play|book|poem|epic poem|epic|tragedy|comedy|story|short story|treatise|essay|dialogue|fairy tale|fable|memoir|children's novel|satire)"  # fmt: skip
_PLACE_NOUN = (r"(?:city|town|village|port|port city|municipality|capital city|commune|metropolis|university|college|"
               r"lake|mountain|peak|volcano|stratovolcano|island|river|desert|national park|park|region|province|"
               r"state|temple|palace|museum|castle|cathedral|mosque|church|basilica|site|building|skyscraper|tower|"
               r"bridge|archipelago|peninsula|plateau|valley|canyon|waterfall|falls|reef|forest|mountain range|"
               r"monument|fortress|complex|prefecture|county|district|area|mausoleum|tomb|settlement|ruins|"
               r"company|corporation|conglomerate|manufacturer)")  # fmt: skip
_RELEASE_KIND = {"film": "released", "album": "released", "video game": "released", "song": "released",
                 "single": "released", "novel": "published", "novella": "published", "book": "published",
                 "poem": "published", "short story": "published", "children's novel": "published"}  # fmt: skip
_PAREN_KINDS = re.compile(r"^(?:(\d{4}) )?(film|novel|play|album|song|opera|painting|book|band|TV series|video game|"
                          r"musical|poem|magazine|newspaper|company|river|city|mountain|volcano|lake|island)$")  # fmt: skip


def _norm(s: str) -> str:
    return normalize_answer(s)


def _contains(haystack: str, needle: str) -> bool:
    """Whole-word containment after normalisation (as `qa_data._contains`)."""
    n = _norm(needle)
    return bool(n) and f" {n} " in f" {_norm(haystack)} "


def _nwords(s: str) -> int:
    return len(_norm(s).split())


def _sentences(text: str) -> list[str]:
    from .qa_data import _sentences as split  # the legacy generator's sentence splitter (initials, "St.", ...)

    return split(text)


def _clean_name(name: str) -> str:
    name = name.strip()
    # a sentence-final period is punctuation, an initial's ("F. Scott") is part of the name
    while name.endswith(".") and not re.search(r"(?:^|\s)[A-Z]\.$", name):
        name = name[:-1]
    return name.rstrip(",;:'\u2019")


_COUNTRY_RX: dict[int, tuple[Mapping, re.Pattern]] = {}


def _country_regex(entities: Mapping[str, Mapping[str, str]]) -> re.Pattern:
    """A regex matching the country names of `entities` (cached per mapping)."""
    got = _COUNTRY_RX.get(id(entities))
    if got is None or got[0] is not entities:
        names = sorted((n for n, b in entities.items() if _is_country(b)), key=len, reverse=True)
        rx = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b") if names else re.compile(r"(?!x)x")
        _COUNTRY_RX.clear()  # one corpus at a time; keeps no stale mappings alive
        _COUNTRY_RX[id(entities)] = got = (entities, rx)
    return got[1]


def _comma_alias(s: str, name: str) -> list[str]:
    """"Delft, Netherlands" for "Delft" when the sentence says so (also right)."""
    i = s.find(name + ", ")
    got = _name_at(s, i + len(name) + 2) if i >= 0 else None
    return [f"{name}, {got[0]}"] if got else []


def _name_at_any(text: str, start: int) -> tuple[str, int] | None:
    """A name at `text[start]` followed by a comma (inside a list "Haidian, Beijing, China")."""
    m = re.compile(NAME).match(text, start)
    if not m or not text.startswith(",", m.end()):
        return None
    return m.group(0), m.end()


def _name_at(text: str, start: int) -> tuple[str, int] | None:
    """The name starting at `text[start]` if it ends cleanly; (name, end offset)."""
    m = re.compile(NAME).match(text, start)
    if not m:
        return None
    raw = m.group(0)
    # an abbreviation that ends a sentence ends the name ("Washington, D.C. It is ..."), an initial does not
    toks = raw.split(" ")
    for i, tok in enumerate(toks[:-1]):
        if tok.endswith(".") and not re.fullmatch(r"[A-Z]\.", tok):
            raw = " ".join(toks[: i + 1])
            break
    # drop a trailing connector chain ("Bay of" cannot end a name: NAME never does) and a trailing "and X"
    name = _clean_name(raw)
    end = start + len(name)
    if " and " in name:  # "Kurt Weill and Hanns Eisler": two people, keep neither (precision)
        return None
    first = name.split()[0]
    if not name or first in _NOT_NAMES or first.rstrip(".") in _NOT_NAMES or first.isdigit():
        return None
    if not _CLEAN_END.match(text[end:]):
        return None
    return name, end


# ---------------------------------------------------------------------------
# relations
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One fact of an article: `relation`, the answer `value` (a span of `sentence`) and gold aliases."""

    title: str
    relation: str
    value: str
    golds: tuple[str, ...]
    sentence: str
    extra: tuple[tuple[str, str], ...] = ()  # e.g. (("tense", "was"), ("kind", "novel"))

    def get(self, key: str, default: str = "") -> str:
        return dict(self.extra).get(key, default)


@dataclass
class Relation:
    name: str
    templates: tuple[str, ...]  # single-hop wordings, {s} = the subject's name; {was}/{kind}/{verb} from extras
    np_templates: tuple[str, ...] = ()  # hop-2 wordings: {s} is a noun phrase ("the author of Moby-Dick")
    bridge_np: str = ""  # hop-1: the noun phrase naming this relation's answer ("the author of {s}")
    answer_kind: str = ""  # what the answer is, for hop-2 chaining: person | place | country | water
    subject_kind: str = ""  # what the subject must be when this relation is hop 2 (same vocabulary)
    extras: dict = field(default_factory=dict)


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in [
        Relation("author", ("Who wrote {s}?", "{S} was written by whom?", "Which author wrote {s}?", "Who is the author of {s}?"),
                 bridge_np="the author of {s}", answer_kind="person"),
        Relation("director", ("Who directed {s}?", "{S} was directed by whom?", "Who was the director of {s}?",
                              "Which filmmaker directed {s}?"),
                 bridge_np="the director of {s}", answer_kind="person"),
        Relation("founder", ("Who founded {s}?", "{S} was founded by whom?", "Who was the founder of {s}?"),
                 bridge_np="the founder of {s}", answer_kind="person"),
        Relation("discoverer", ("Who discovered {s}?", "{S} was discovered by whom?", "Who first discovered {s}?"),
                 bridge_np="the discoverer of {s}", answer_kind="person"),
        Relation("nationality", ("What nationality {was} {s}?", "Of what nationality {was} {s}?",
                                 "{S} {was} a citizen of which nationality?"),
                 np_templates=("What nationality was {s}?", "Of what nationality was {s}?"), subject_kind="person"),
        Relation("birthplace", ("Where was {s} born?", "What is the birthplace of {s}?", "{S} was born where?",
                                "In which place was {s} born?"),
                 np_templates=("Where was {s} born?", "What is the birthplace of {s}?"), subject_kind="person",
                 bridge_np="the birthplace of {s}", answer_kind="place"),
        Relation("capital", ("What is the capital of {s}?", "Which city is the capital of {s}?",
                             "{S} has which city as its capital?", "Name the capital city of {s}."),
                 np_templates=("What is the capital of {s}?", "Which city is the capital of {s}?"), subject_kind="country",
                 bridge_np="the capital of {s}", answer_kind="place"),
        Relation("capital_of", ("{S} is the capital of which {kind}?", "Of which {kind} is {s} the capital?",
                                "Which {kind} has {s} as its capital?"),
                 bridge_np="the {kind} whose capital is {s}", answer_kind="country"),
        Relation("country", ("In which {kind} is {s}?", "{S} is located in which {kind}?", "Which {kind} is {s} in?"),
                 np_templates=("In which {kind} is {s}?", "{S} is located in which {kind}?"), subject_kind="place",
                 bridge_np="the {kind} in which {s} lies", answer_kind="country"),
        Relation("city", ("In which city is {s} located?", "{S} is located in which city?", "Which city is {s} in?"),
                 bridge_np="the city where {s} is located", answer_kind="place"),
        Relation("headquarters", ("Where is {s} headquartered?", "In which city is {s} headquartered?",
                                  "Where are the headquarters of {s}?"),
                 bridge_np="the city where {s} is headquartered", answer_kind="place"),
        Relation("founded", ("In which year was {s} {verb}?", "When was {s} {verb}?", "{S} was {verb} in what year?"),
                 np_templates=("In which year was {s} {verb}?", "When was {s} {verb}?"), subject_kind="any"),
        Relation("work_year", ("In which year was the {kind} {s} {verb}?", "When was the {kind} {s} {verb}?",
                               "The {kind} {s} was {verb} in what year?")),
        Relation("population", ("What is the population of {s}?", "How many people live in {s}?",
                                "{S} has a population of about how many people?"),
                 np_templates=("What is the population of {s}?", "How many people live in {s}?"), subject_kind="placecountry"),
        Relation("elevation", ("What is the elevation of {s}?", "How high above sea level is {s}?",
                               "At what elevation is {s}?"),
                 np_templates=("What is the elevation of {s}?",), subject_kind="place"),
        Relation("length", ("How long is {s}?", "What is the length of {s}?", "{S} is how long?")),
        Relation("area", ("What is the area of {s}?", "How large is {s} in area?", "{S} covers what area?"),
                 np_templates=("What is the area of {s}?",), subject_kind="placecountry"),
        Relation("mouth", ("Into which body of water does {s} flow?", "Where does {s} empty?",
                           "What does {s} flow into?"),
                 bridge_np="the body of water that {s} flows into", answer_kind="water"),
        Relation("discovery_year", ("In which year was {s} discovered?", "When was {s} discovered?",
                                    "{S} was discovered in what year?")),
    ]
}


def _is_country(a: Mapping[str, str] | None) -> bool:
    d = (a or {}).get("description", "")
    return bool(re.match(r"(?i)^(?:(?:island|landlocked|transcontinental|sovereign|constitutional monarchy and )?"
                         r"(?:country|nation|microstate|city-state|sovereign state)\b)", d))  # fmt: skip


def _is_us_state(a: Mapping[str, str] | None) -> bool:
    return (a or {}).get("description", "").startswith("U.S. state")


def _kind_of(a: Mapping[str, str]) -> str:
    """person | country | place | water | other, from the topic and the short description."""
    d = a.get("description", "").lower()
    if a.get("topic") == "People":
        return "person"
    if _is_country(a):
        return "country"
    if a.get("topic") == "Geography" or re.search(r"\b(?:city|town|capital|municipality|metropolis|state|province)\b", d):
        if re.search(r"\b(?:sea|ocean|gulf|bay|strait|lake)\b", d) and not re.search(r"\bcity\b", d):
            return "water"
        return "place"
    return "other"


def subject_name(a: Mapping[str, str], titles: Mapping[str, Any] | None = None) -> str | None:
    """How a question names the article: its title, "the 1960 film Psycho" for "Psycho (1960 film)",
    None when a parenthesised title cannot be named unambiguously."""
    t = a["title"]
    m = re.match(r"^(.*?) \((.+)\)$", t)
    if not m:
        # "the Nile", "the University of Oxford": as the passage itself names it
        return f"the {t}" if a.get("extract", "").startswith(f"The {t} ") else t
    base, paren = m.group(1), m.group(2)
    k = _PAREN_KINDS.match(paren)
    if not k:
        return None
    year, kind = k.group(1), k.group(2)
    return f"the {year + ' ' if year else ''}{kind} {base}"


def _subject_re(a: Mapping[str, str]) -> re.Pattern:
    """How a sentence (other than the lead's first) may start when it is about the article."""
    t = a["title"]
    base = re.sub(r"\s*\([^)]*\)$", "", t)
    names = {re.escape(base)}
    if a.get("topic") == "People" and " " in base:
        names.add(re.escape(base.split()[-1]))  # the surname
    alts = "|".join(sorted(names, key=len, reverse=True))
    return re.compile(rf"^(?:The |the )?(?:{alts})\b|^(?:It|He|She|They)\b|^The {_SENT_SUBJ_NOUN}\b")


def _golds_with_unit(num: str, unit: str) -> tuple[str, ...]:
    unit_l = unit.lower()
    alias = {
        "m": ("m", "metres", "meters"), "metres": ("metres", "meters", "m"), "meters": ("meters", "metres", "m"),
        "km": ("km", "kilometres", "kilometers"), "kilometres": ("kilometres", "kilometers", "km"),
        "kilometers": ("kilometers", "kilometres", "km"), "ft": ("ft", "feet"), "feet": ("feet", "ft"),
        "mi": ("mi", "miles"), "miles": ("miles", "mi"),
        "km2": ("km2", "square kilometres", "square kilometers", "km²"),
        "square kilometres": ("square kilometres", "km2", "square kilometers", "km²"),
        "square kilometers": ("square kilometers", "km2", "square kilometres", "km²"),
        "sq mi": ("sq mi", "square miles"), "square miles": ("square miles", "sq mi"),
    }.get(unit_l, (unit,))
    return tuple(f"{num} {u}" for u in alias)


def _add(out: list[Fact], a, relation, value, sentence, golds=None, **extra) -> None:
    value = value.strip()
    if not value or not _contains(sentence, value) or not _contains(a["extract"], value):
        return
    if _norm(value) == _norm(a["title"]) or _contains(a["title"], value) or _nwords(value) > 4:
        return
    golds = tuple(dict.fromkeys([value, *(g for g in (golds or ()) if g and _nwords(g) <= 5)]))
    out.append(Fact(a["title"], relation, value, golds, sentence, tuple(sorted(extra.items()))))


def _name_after(s: str, pattern: str, flags: int = 0) -> list[tuple[str, int]]:
    """Clean names right after each match of `pattern` (which ends where the name starts)."""
    out = []
    for m in re.finditer(pattern, s, flags):
        got = _name_at(s, m.end())
        if got:
            out.append((got[0], m.start()))
    return out


def _place_numbers(facts: list[Fact], a: Mapping[str, str], s: str) -> None:
    """Population, elevation and area of a country or place, when the sentence states exactly one."""
    if s.count("population") == 1:
        m = re.search(rf"\b(?:population of|[Tt]he population (?:is|was)) (?:about |approximately |around |roughly |"
                      rf"over |more than |almost |nearly |some |just over |an estimated )?"
                      rf"({_NUM}(?: million| billion)?)(?! (?:km|square|sq))", s)  # fmt: skip
        # the city's own count, not its metropolitan / statistical / urban area's
        if m and not re.search(r"\bmetropolitan|\burban\b|\bmetro\b|\bregion\b|\bdistrict|\bstatistical area|"
                               r"\bcombined\b|\bgreater\b|\bagglomeration|\bconurbation|\bcounty\b|\bdiaspora", s):
            _add(facts, a, "population", m.group(1), s)
    if s.count("elevation") == 1:
        m = re.search(rf"\belevation of (?:about |approximately )?({_NUM}) ?(m|metres|meters|ft|feet)\b", s)
        if m:
            _add(facts, a, "elevation", f"{m.group(1)} {m.group(2)}", s, golds=_golds_with_unit(m.group(1), m.group(2)))
    if len(re.findall(r"\barea of\b", s)) == 1 and not re.search(r"\b(?:drainage|basin|watershed|catchment|metropolitan|urban)\b", s):
        m = re.search(rf"\barea of (?:about |approximately |around |roughly |over |more than |almost |nearly |some )?"
                      rf"({_NUM}) ?(km2|square kilometres|square kilometers|sq mi|square miles)\b", s)  # fmt: skip
        if m:
            _add(facts, a, "area", f"{m.group(1)} {m.group(2)}", s, golds=_golds_with_unit(m.group(1), m.group(2)))


def extract_facts(a: Mapping[str, str], entities: Mapping[str, Mapping[str, str]] | None = None) -> list[Fact]:
    """The facts stated in article `a`'s passage (its `extract`), at most one per relation.

    `entities`: title -> article, used to type answers (a country vs a region) when given.
    """
    entities = entities or {}
    extract, topic = a["extract"], a.get("topic", "")
    desc = a.get("description", "").lower()
    sents = _sentences(extract)
    subj = _subject_re(a)
    kind = _kind_of(a)
    facts: list[Fact] = []
    base = re.sub(r"\s*\([^)]*\)$", "", a["title"])
    for i, s in enumerate(sents):
        about = i == 0 or bool(subj.match(s))
        if kind == "country":
            # the capital, however the sentence starts ("Tokyo is the country's capital and largest city.")
            capital = [n for n, _ in _name_after(
                s, r"\b(?:[Ii]ts|[Tt]he|[Tt]he (?:country|nation|state|island)'s|[Tt]he nation's) "
                   r"capital(?: city)?(?:,? (?:and )?(?:largest|most populous) city)?(?:,? and (?:economic|financial|cultural) "
                   r"cent(?:re|er))? is (?:the city of )?")]  # fmt: skip
            m = re.match(rf"^({NAME}),? (?:is )?the (?:(?:country|nation)'s )?capital(?: city)?(?: and (?:largest|most populous) city)?\b", s)
            if m and re.match(rf"^{NAME}, the capital|^{NAME} is the (?:country|nation)'s capital", s):
                capital.append(_clean_name(m.group(1)))
            for name in capital[:1]:
                _add(facts, a, "capital", name, s)
        # numbers of a place may come in a sentence that does not start with it ("With a population of ...")
        relaxed = (not about and kind in ("country", "place") and topic != "People"
                   and (s.startswith(("With ", "As of ", "Located ", "Covering ", "Spanning ", "At an ", "The population "))
                        or _contains(s, base))
                   and not re.search(r"\b(?:largest|capital|cities|city|metropolitan|urban|region|province|district)\b", s))  # fmt: skip
        if relaxed:
            _place_numbers(facts, a, s)
        if not about:
            continue
        first = i == 0
        based = re.search(r"\b(?:based on|adapted from|adaptation of|inspired by)\b", s)
        cut = based.start() if based else len(s)
        # --- author: "X is a 1851 epic novel by American writer Herman Melville"
        if topic != "People":
            for name, pos in _name_after(
                s, rf"\b{_WORK_KIND},? (?:(?:first )?(?:written|published) )?by (?:the )?(?:(?:[A-Z][a-z]+ )?"
                   r"(?:author|writer|novelist|poet|playwright|dramatist|philosopher|scholar) )?"):  # fmt: skip
                if pos < cut and first:
                    _add(facts, a, "author", name, s)
        # --- director: "... film directed by Fritz Lang"
        if re.search(r"\bfilm\b", s[:cut]) and first:
            for name, pos in _name_after(s, r"\b(?:produced and )?directed by "):
                if pos < cut:
                    _add(facts, a, "director", name, s)
        # --- work year: "Psycho is a 1960 American horror film"
        if first:
            m = re.search(rf"\b(?:is|was) an? ({_YEAR}) (?:[\w'-]+ ){{0,5}}?({'|'.join(map(re.escape, _RELEASE_KIND))})\b", s)
            if m and m.start() < cut:
                k = m.group(2)
                _add(facts, a, "work_year", m.group(1), s, kind=k, verb=_RELEASE_KIND[k])
        # --- founder / founded year
        m = re.search(rf"\b(?:was|were|is) (?:officially |originally |first )?(founded|established|co-founded)"
                      rf"(?: as [^,.;]*?)?(?: by [^,.;]*?)? in ({_YEAR})\b", s)  # fmt: skip
        if m and topic != "People" and (first or subj.match(s)):
            verb = "founded" if m.group(1) != "established" else "established"
            _add(facts, a, "founded", m.group(2), s, verb=verb)
        if topic != "People":
            for name, pos in _name_after(s, r"\b(?:was|were|is) (?:originally |first )?(?:founded|co-founded|established) by "):
                if pos < cut:
                    _add(facts, a, "founder", name, s)
        # --- discoverer / discovery year (elements, particles, fossils...)
        if topic != "People":
            for name, pos in _name_after(s, rf"\b(?:was|were) (?:first )?discovered (?:in {_YEAR} )?by (?:[a-z]+ ){{0,2}}"):
                _add(facts, a, "discoverer", name, s)
            m = re.search(rf"\b(?:was|were) (?:first )?discovered (?:by [^,.;]*? )?in ({_YEAR})\b", s)
            if m and s.count("discover") == 1:
                _add(facts, a, "discovery_year", m.group(1), s)
        # --- people: nationality (lead sentence), birthplace
        if topic == "People" and first:
            m = re.search(r"\b(is|was) an? ((?:[A-Z][a-z]+-)?[A-Z][a-z]+) (?=[a-z])", s)
            if m and _DEMONYM.match(m.group(2)) and m.group(2) not in _NOT_DEMONYM and m.start() < 120:
                # "a French and Swiss film director": either is right
                both = re.match(r"and ((?:[A-Z][a-z]+-)?[A-Z][a-z]+) (?=[a-z])", s[m.end():])
                alias = [both.group(1), f"{m.group(2)} and {both.group(1)}"] if both and _DEMONYM.match(both.group(1)) else []
                _add(facts, a, "nationality", m.group(2), s, golds=alias, was=m.group(1))
        if topic == "People":
            # "He was born in Delft", "Born in Lausanne, ...", "..., born in Saint-Germain-en-Laye" (the subject's
            # own birth), never "the first laureate born in Africa"
            for name, pos in _name_after(s, r"(?:\b(?:[Hh]e|[Ss]he|who) was born|^Born|, born|^\w+(?: \w+)? was born) (?:and raised )?in (?:the )?"):
                if re.match(rf"^(?:{_YEAR})$", name) or name.split()[0] in ("House", "Family", "Clan", "Dynasty"):
                    continue  # "born in the House of Draculesti" is a family, not a place
                # "Delft, Netherlands" is also right
                _add(facts, a, "birthplace", name, s, golds=_comma_alias(s, name))
                break
        # --- places
        if kind in ("country", "place") and topic != "People":
            if first:
                for name, _ in _name_after(s, r"\b(?:is|was) the (?:national )?capital(?: city)?(?: and (?:largest|most populous) city)? of (?:the )?"):
                    b = entities.get(name)
                    k = "country" if _is_country(b) else "state" if _is_us_state(b) else ""
                    if k:
                        _add(facts, a, "capital_of", name, s, kind=k)
            _place_numbers(facts, a, s)
        # --- the country (or U.S. state) a place, building, institution... is in: the lead sentence's
        # "is a <noun> in [the] [region-adjective] A, B, C", the last of A, B, C that is a country
        if first and topic != "People" and kind != "country":
            # "is" only: "Antioch was a city located in northern Syria" is history, not where it is
            m = re.search(rf"\bis (?:a|an|the) (?:[\w'-]+ ){{0,5}}?{_PLACE_NOUN} (?:located |situated )?"
                          r"(?:in|of) (?:the )?(?:(?:north|south|east|west|central|northern|southern|eastern|western|"
                          r"north-?eastern|north-?western|south-?eastern|south-?western) )?", s[:cut])  # fmt: skip
            if m:
                chain, pos = [], m.end()
                while len(chain) < 4:
                    got = _name_at(s, pos) or _name_at_any(s, pos)
                    if not got:
                        break
                    chain.append(got)
                    if not s.startswith(", ", got[1]):
                        break
                    pos = got[1] + 2
                    if s.startswith("the ", pos):
                        pos += 4
                clean = bool(chain) and _CLEAN_END.match(s[chain[-1][1]:]) is not None
                for name, _end in reversed(chain if clean else []):
                    b = entities.get(name)
                    k = "country" if _is_country(b) else "U.S. state" if _is_us_state(b) else ""
                    if k:
                        _add(facts, a, "country", name, s, kind=k)
                        break
                if clean and not any(f.relation == "country" for f in facts) and kind == "place":
                    # "Nanjing is the capital of Jiangsu, East China": the one country the lead sentence names,
                    # after "in"/"of" (never "between X and Y", never a border)
                    named = set(_country_regex(entities).findall(s)) - {a["title"]}
                    if len(named) == 1 and not re.search(r"\b(?:border|borders|bordering|between)\b", s):
                        name = named.pop()
                        if re.search(rf"\b(?:in|of) (?:the )?(?:[\w'-]+,? ){{0,4}}?{re.escape(name)}\b", s):
                            _add(facts, a, "country", name, s, kind="country")
                # the city among them ("a public research university in Haidian, Beijing, China" -> Beijing),
                # for what is not itself a city: a city of a city is a district, not a fact people ask
                is_city = re.compile(r"\b(?:city|capital|town|municipality|metropolis)\b")
                if not is_city.search(desc) and not re.search(r"\b(?:city|town|capital|municipality|village|state|"
                                                              r"province|region|county|district|prefecture)\b", m.group(0)):
                    for name, _end in chain if clean else []:
                        b = entities.get(name)
                        if b is not None and _kind_of(b) == "place" and is_city.search(b.get("description", "").lower()):
                            _add(facts, a, "city", name, s)
                            break
        if re.search(r"\briver\b", desc) or re.search(r"\bRiver\b", a["title"]):
            if len(re.findall(r"\blength of\b|\blong\b", s)) == 1 and "basin" not in s:
                m = re.search(rf"\blength of (?:about |approximately |around )?({_NUM}) ?(km|kilometres|kilometers|mi|miles)\b", s) or \
                    re.search(rf"\b(?:is|was) (?:about |approximately |around )?({_NUM}) ?(km|kilometres|kilometers|miles)(?: \([^)]*\))? long\b", s)  # fmt: skip
                if m:
                    _add(facts, a, "length", f"{m.group(1)} {m.group(2)}", s, golds=_golds_with_unit(m.group(1), m.group(2)))
            for name, _ in _name_after(s, r"\b(?:empties|drains|flows|discharges) into (?:the )?"):
                _add(facts, a, "mouth", f"{name}", s)
                break
        # --- headquarters (companies, organisations)
        if topic != "People" and kind != "country":
            for name, _ in _name_after(s, r"\b(?:headquartered|based) in (?:the )?|\bhas its headquarters in (?:the )?"
                                          r"|\bheadquarters (?:is|are) (?:located )?in (?:the )?"):  # fmt: skip
                if "based in" in s and not re.search(r"headquarter", s) and not re.search(r"\b(?:company|corporation|organi[sz]ation|agency|conglomerate|firm|bank|manufacturer|network|broadcaster)\b", s):
                    continue
                _add(facts, a, "headquarters", name, s, golds=_comma_alias(s, name))
                break
    # at most one fact per relation (the first stated), and never two relations with the same answer
    seen_rel, seen_val, out = set(), set(), []
    for f in facts:
        if f.relation in seen_rel or _norm(f.value) in seen_val:
            continue
        if RELATIONS[f.relation].answer_kind == "person" and " " not in f.value:
            # a one-word "person" is a person only if the corpus has them ("Voltaire"), not "Lithuanians"
            b = entities.get(f.value)
            if b is None or b.get("topic") != "People":
                continue
        seen_rel.add(f.relation)
        seen_val.add(_norm(f.value))
        out.append(f)
    return out


# ---------------------------------------------------------------------------
# questions
# ---------------------------------------------------------------------------


def _fill(tpl: str, s: str, fact: Fact) -> str:
    ex = dict(fact.extra)
    q = tpl.replace("{S}", s[:1].upper() + s[1:]).replace("{s}", s)
    q = q.replace("{was}", ex.get("was", "was")).replace("{kind}", ex.get("kind", "")).replace("{verb}", ex.get("verb", ""))
    return q[:1].upper() + q[1:]


def _row(qtype: str, relation: str, question: str, golds: Sequence[str], titles: list[str], **meta: Any) -> dict:
    return {
        "question": question,
        "golden_answers": list(golds),
        "metadata": {"qtype": qtype, "relation": relation, "titles": titles, **meta},
    }


# words a searcher adds to a name to find the right passage ("Thailand country", "Nile length")
_REL_WORD = {"population": "population", "area": "area", "capital": "capital", "elevation": "elevation",
             "founded": "founded", "birthplace": "born", "length": "length", "headquarters": "headquarters",
             "author": "author", "director": "film", "mouth": "river", "discoverer": "discovered",
             "discovery_year": "discovered", "work_year": "", "nationality": "", "country": "", "capital_of": "capital",
             "founder": "founded", "city": "city"}  # fmt: skip
_KIND_WORD = {"country": "country", "place": "", "person": "", "water": "", "other": ""}


def _dedup(xs: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(x for x in xs if x))


def choose_queries(rows: Sequence[dict], retriever: Any | None = None, topk: int = 1, batch_size: int = 512) -> None:
    """Set each row's `metadata.queries` (one search per hop) from its `query_options`, in place.

    Without a retriever: the first option of each hop (the subject; the bridge entity with a
    kind word, "Thailand country").  With one: the first option whose top-`topk` passages
    include the hop's article (BM25 ranks a bare country name below "History of X"), else
    the first; `metadata.query_hits` records per hop whether the chosen query finds it.
    """
    from .corpus import parse_contents

    todo = [(r, h, opts) for r in rows for h, opts in enumerate(r["metadata"].get("query_options") or [])]
    chosen: dict[tuple[int, int], tuple[str, bool | None]] = {}
    if retriever is None:
        chosen = {(id(r), h): (opts[0], None) for r, h, opts in todo}
    else:
        flat = [(r, h, q) for r, h, opts in todo for q in opts]
        hits: dict[tuple[int, int, str], bool] = {}
        for i in range(0, len(flat), batch_size):
            chunk = flat[i : i + batch_size]
            for (r, h, q), res in zip(chunk, retriever.search([q for _, _, q in chunk], topk)):
                hits[(id(r), h, q)] = any(parse_contents(d["contents"])[0] == r["metadata"]["titles"][h] for d in res)
        for r, h, opts in todo:
            good = [q for q in opts if hits[(id(r), h, q)]]
            chosen[(id(r), h)] = (good[0], True) if good else (opts[0], False)
    for r in rows:
        opts = r["metadata"].pop("query_options", None)
        if not opts:
            continue
        picks = [chosen[(id(r), h)] for h in range(len(opts))]
        r["metadata"]["queries"] = [q for q, _ in picks]
        if retriever is not None:
            r["metadata"]["query_hits"] = [bool(ok) for _, ok in picks]


def natural_candidates(a: Mapping[str, str], facts: Sequence[Fact], rng: random.Random) -> list[dict]:
    """Single-hop questions for article `a`: one per fact, in a wording drawn with `rng`."""
    s = subject_name(a)
    if s is None:
        return []
    out = []
    for f in facts:
        rel = RELATIONS[f.relation]
        tpl = rng.choice(rel.templates)
        if s.startswith("the ") and "{kind} {s}" in tpl:  # "the film Vertigo": not "the film the film Vertigo"
            tpl = tpl.replace("the {kind} {s}", "{s}").replace("The {kind} {s}", "{S}")
        q = _fill(tpl, s, f)
        if any(_contains(q, g) for g in f.golds):
            continue
        out.append(_row("natural", f.relation, q, f.golds, [a["title"]], subject=s, passage_sentence=f.sentence,
                        query_options=[_dedup([s, q, f"{s} {_REL_WORD.get(f.relation, '')}".strip()])]))
    return out


def _subject_ok(kind: str, b: Mapping[str, str]) -> bool:
    k = _kind_of(b)
    return (
        kind == "any"
        or kind == k
        or (kind == "placecountry" and k in ("place", "country"))
    )


def twohop_candidates(
    a: Mapping[str, str],
    facts_of: Mapping[str, Sequence[Fact]],
    by_name: Mapping[str, Mapping[str, str]],
    rng: random.Random,
    allow_b_names_a: bool = False,
) -> list[dict]:
    """Two-hop questions whose hop 1 is a fact of `a` answered by another article B's title.

    `allow_b_names_a`: also keep questions whose B passage names A (then one well-aimed search can
    land on B directly; marked `metadata.b_names_a`)."""
    s = subject_name(a)
    if s is None:
        return []
    out = []
    for f1 in facts_of.get(a["title"], ()):
        rel1 = RELATIONS[f1.relation]
        if not rel1.bridge_np:
            continue
        b = by_name.get(f1.value)
        if b is None or b["title"] == a["title"]:
            continue
        bname = subject_name(b) or b["title"]
        np = rel1.bridge_np.replace("{s}", s).replace("{kind}", f1.get("kind"))
        for f2 in facts_of.get(b["title"], ()):
            rel2 = RELATIONS[f2.relation]
            if not rel2.np_templates or not _subject_ok(rel2.subject_kind, b):
                continue
            if f1.relation == "capital_of" and f2.relation == "capital":
                continue  # "the capital of the country whose capital is X": circular
            if f1.relation in ("capital", "country") and f2.relation in ("capital_of", "country"):
                continue
            golds = f2.golds
            # answerable only through B: the final answer is in B's passage, not in A's; and B's passage does
            # not name A (else one search for A's name plus the relation could land on B directly:
            # "the population of the country whose capital is Oslo" finds Norway's "Its capital is Oslo")
            if any(_contains(a["extract"], g) for g in golds) or _contains(b["extract"], f2.value) is False:
                continue
            b_names_a = _contains(b["extract"], re.sub(r"\s*\([^)]*\)$", "", a["title"])) or _contains(b["extract"], s)
            if b_names_a and not allow_b_names_a:
                continue
            q = _fill(rng.choice(rel2.np_templates), np, f2)
            if _contains(q, bname) or _contains(q, b["title"]) or _contains(q, f1.value) or any(_contains(q, g) for g in golds):
                continue
            hop1_q = _fill(rng.choice(rel1.templates), s, f1)
            hop2_q = _fill(rng.choice(rel2.np_templates), bname, f2)
            kw, kind = _REL_WORD.get(f2.relation, ""), _KIND_WORD.get(_kind_of(b), "")
            hop2 = _dedup([f"{bname} {kind}".strip(), f"{bname} {kw} {kind}".strip(), bname, hop2_q, f"{bname} {kw}".strip()])
            out.append(_row("twohop", f"{f1.relation}>{f2.relation}", q, golds, [a["title"], b["title"]],
                            subject=s, bridge=f1.value, hop_questions=[hop1_q, hop2_q], b_names_a=b_names_a,
                            query_options=[_dedup([s, hop1_q]), hop2]))
    return out


# ---------------------------------------------------------------------------
# article split grouped by two-hop links
# ---------------------------------------------------------------------------


def split_articles_grouped(
    titles: Sequence[str],
    links: Iterable[tuple[str, str]],
    rng: random.Random,
    frac_dev: float = 0.1,
    frac_test: float = 0.1,
    max_group: int = 40,
    linked_frac_test: float = 0.3,
) -> dict[str, str]:
    """title -> "train" | "dev" | "test".

    Articles joined by a link (a two-hop question's A and B) are merged into one group
    (union-find, links in random order, a merge skipped when the group would exceed
    `max_group`: hubs such as a country linked to all its cities would otherwise pull the
    corpus into one group), then whole groups fill test and dev up to their shares of the
    articles; linked groups go first, `linked_frac_test` of their articles to test (more
    two-hop questions to test on), `frac_dev` to dev."""
    parent = {t: t for t in titles}
    size = {t: 1 for t in titles}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    links = sorted({tuple(sorted(p)) for p in links if p[0] in parent and p[1] in parent and p[0] != p[1]})
    rng.shuffle(links)
    for x, y in links:
        rx, ry = find(x), find(y)
        if rx != ry and size[rx] + size[ry] <= max_group:
            if size[rx] < size[ry]:
                rx, ry = ry, rx
            parent[ry] = rx
            size[rx] += size[ry]
    groups: dict[str, list[str]] = defaultdict(list)
    for t in titles:
        groups[find(t)].append(t)
    order = sorted(groups)
    rng.shuffle(order)
    n = len(titles)
    want = {"test": round(n * frac_test), "dev": round(n * frac_dev)}
    have = {"test": 0, "dev": 0}
    out: dict[str, str] = {}
    # linked groups (those behind two-hop questions) first, with their own shares: two-hop questions
    # are rare, and a random 10% of articles would leave a handful of them for the test set
    linked = [g for g in order if len(groups[g]) > 1]
    n_linked = sum(len(groups[g]) for g in linked)
    lwant = {"test": round(n_linked * linked_frac_test), "dev": round(n_linked * frac_dev)}
    lhave = {"test": 0, "dev": 0}
    for g in linked + [g for g in order if len(groups[g]) == 1]:
        members = groups[g]
        split = "train"
        for s in ("test", "dev"):
            if len(members) > 1 and lhave[s] + len(members) > lwant[s]:
                continue
            if have[s] + len(members) <= want[s]:
                split = s
                have[s] += len(members)
                if len(members) > 1:
                    lhave[s] += len(members)
                break
        for t in members:
            out[t] = split
    return out


# ---------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------


def _entity_index(arts: Sequence[Mapping[str, str]]) -> dict[str, Mapping[str, str]]:
    """name -> article, for names that identify one article: its title, and its base title without
    a parenthesis when no other article has that base."""
    by_name: dict[str, Mapping[str, str]] = {a["title"]: a for a in arts}
    base_count = Counter(re.sub(r"\s*\([^)]*\)$", "", a["title"]) for a in arts)
    for a in arts:
        base = re.sub(r"\s*\([^)]*\)$", "", a["title"])
        if base != a["title"] and base_count[base] == 1 and base not in by_name:
            by_name[base] = a
    return by_name


def _cap_relations(rows: list[dict], share: float) -> list[dict]:
    """Keep rows (in order) so that no relation exceeds `share` of what is kept."""
    counts = Counter(r["metadata"]["relation"] for r in rows)
    total = sum(counts.values())
    cap = {r: min(c, int(share / (1 - share) * (total - c))) for r, c in counts.items()}
    cap = {r: max(k, 1) for r, k in cap.items()}
    kept, used = [], Counter()
    for r in rows:
        rel = r["metadata"]["relation"]
        if used[rel] < cap[rel]:
            used[rel] += 1
            kept.append(r)
    return kept


def generate_natural_qa(
    articles: Sequence[Mapping[str, str]],
    *,
    seed: int = 0,
    types: Sequence[str] = NATURAL_TYPES,
    n_train: int = 4000,
    n_dev: int = 300,
    n_test: int = 500,
    mix: Mapping[str, float] | None = None,
    frac_dev: float = 0.1,
    frac_test: float = 0.1,
    max_answer_words: int = 4,
    max_relation_share: float = 0.4,
    max_per_bridge_fact: int = 2,
    allow_b_names_a: bool = False,
    linked_frac_test: float = 0.3,
    max_group: int = 40,
    data_source: str = "wiki10k_nq",
    retriever: Any | None = None,
    query_topk: int = 1,
) -> dict[str, list[dict]]:
    """``{"train", "dev", "test"}`` question rows of the given `types` (natural, twohop, and the legacy
    desc2title/title2desc/cloze/bridge), split by article, deterministic for a seed.

    Every question of a split is built only from articles of that split (both hops; for
    the legacy types all of `metadata.titles`).  `mix`: target share per type (default:
    natural 0.7, twohop 0.3, the legacy types as in `qa_data.DEFAULT_MIX`); a type short of
    candidates is topped up from the others.  `max_relation_share`: no relation makes more
    than this share of a split's natural questions (nationality alone would be ~60%).
    `max_per_bridge_fact`: two-hop questions per split that end in the same fact of the same
    bridge article.  `allow_b_names_a`: keep two-hop questions whose second passage names the
    first article too (about 2.5x more two-hop questions, but one search can shortcut them;
    `metadata.b_names_a` marks them).  `linked_frac_test`: the share of the articles behind
    two-hop questions that go to test, `max_group` the largest group of linked articles kept
    together (`split_articles_grouped`).  `retriever` (optional, e.g. BM25 over the corpus): picks each hop's oracle query among
    its options so that it finds the hop's passage in the top `query_topk` (`choose_queries`).
    """
    from . import qa_data as Q

    types = list(dict.fromkeys(types))
    unknown = [t for t in types if t not in NATURAL_TYPES + LEGACY_TYPES]
    if not types or unknown:
        raise ValueError(f"unknown question types {unknown}; known: {list(NATURAL_TYPES + LEGACY_TYPES)}")
    if mix is None:
        mix = {t: DEFAULT_NATURAL_MIX.get(t, Q.DEFAULT_MIX.get(t, 0.0)) for t in types}
    mix = {t: float(mix.get(t, 0.0)) for t in types}
    if any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError("mix must map question types to non-negative shares with a positive sum")
    arts = sorted(articles, key=lambda a: a["title"])
    by_title = {a["title"]: a for a in arts}
    by_name = _entity_index(arts)
    facts_of = {a["title"]: extract_facts(a, by_name) for a in arts}
    # candidates over the whole corpus (wording drawn per article), then the split by article
    crng = random.Random(f"{seed}-candidates")
    cands: dict[str, list[dict]] = defaultdict(list)
    for a in arts:
        if "natural" in types:
            cands["natural"].extend(natural_candidates(a, facts_of[a["title"]], crng))
        if "twohop" in types:
            cands["twohop"].extend(twohop_candidates(a, facts_of, by_name, crng, allow_b_names_a))
    if any(t in LEGACY_TYPES for t in types):
        ents = Q._Entities(arts)
        desc_count = Counter(a.get("description", "").casefold() for a in arts if a.get("description"))
        for a in arts:
            for qtype, rows in Q._candidates_for(a, ents, desc_count, crng, max_answer_words).items():
                if qtype in types:
                    cands[qtype].extend(rows)
    for qtype in cands:
        cands[qtype] = [r for r in cands[qtype] if all(_nwords(g) <= max_answer_words + 1 for g in r["golden_answers"][:1])]
    links = [tuple(r["metadata"]["titles"][:2]) for t in cands for r in cands[t] if len(r["metadata"]["titles"]) >= 2]
    split_of = split_articles_grouped([a["title"] for a in arts], links, random.Random(seed), frac_dev, frac_test,
                                      linked_frac_test=linked_frac_test, max_group=max_group)  # fmt: skip
    wanted = {"train": n_train, "dev": n_dev, "test": n_test}
    result: dict[str, list[dict]] = {}
    seen_questions: set[str] = set()
    for split in ("test", "dev", "train"):
        srng = random.Random(f"{seed}-{split}")
        pools: dict[str, list[dict]] = {}
        for qtype in sorted(cands):
            rows = [r for r in cands[qtype] if all(split_of.get(t) == split for t in r["metadata"]["titles"])
                    and all(t in by_title for t in r["metadata"]["titles"])]
            srng.shuffle(rows)
            if qtype == "natural" and 0 < max_relation_share < 1:
                rows = _cap_relations(rows, max_relation_share)
            pools[qtype] = rows
        n = min(wanted[split], sum(len(v) for v in pools.values()))
        total = sum(mix.values())
        quota = {t: int(round(n * mix[t] / total)) for t in sorted(mix)}
        chosen: list[dict] = []
        used: set[tuple[str, str]] = set()
        # a hub (a country with many cities in the corpus) would make one two-hop answer a large share
        # of the split ("the area of the country in which <any Chinese city> lies"): at most 2 per hop-2 fact
        per_fact: Counter = Counter()

        def take(qtype: str, k: int) -> None:
            pool = pools.get(qtype, [])
            while k > 0 and pool and len(chosen) < n:
                row = pool.pop()
                key = _norm(row["question"])
                rel = row["metadata"].get("relation", qtype)
                ident = (row["metadata"]["titles"][0], rel)
                fact = (row["metadata"]["titles"][-1], rel.split(">")[-1]) if qtype == "twohop" else None
                if key in seen_questions or ident in used or (fact and per_fact[fact] >= max_per_bridge_fact):
                    continue
                if fact:
                    per_fact[fact] += 1
                seen_questions.add(key)
                used.add(ident)
                chosen.append(row)
                k -= 1

        for qtype in sorted(quota):
            if mix[qtype] > 0:
                take(qtype, quota[qtype])
        while len(chosen) < n and any(pools[t] for t in pools if mix.get(t, 0) > 0):
            for qtype in sorted(pools):
                if mix.get(qtype, 0) > 0:
                    take(qtype, 1)
        srng.shuffle(chosen)
        choose_queries(chosen, retriever, topk=query_topk)
        result[split] = [
            {"id": f"{data_source}_{split}_{i:05d}", "question": r["question"], "golden_answers": r["golden_answers"],
             "data_source": data_source, "metadata": r["metadata"]}
            for i, r in enumerate(chosen)
        ]  # fmt: skip
    return {k: result[k] for k in ("train", "dev", "test")}


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def _type_key(row: Mapping[str, Any]) -> str:
    meta = row.get("metadata") or {}
    if isinstance(meta, str):
        meta = json.loads(meta or "{}")
    return f"{meta.get('qtype', '?')}:{meta.get('relation', meta.get('qtype', '?'))}"


def type_report(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, int]]:
    """Counts per `qtype:relation` per split."""
    return {s: dict(sorted(Counter(_type_key(r) for r in rows).items())) for s, rows in splits.items()}


def difficulty_table(
    rows: Sequence[Mapping[str, Any]],
    retriever: Any,
    topk: int = 3,
    models: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    by_relation: bool = True,
) -> str:
    """Markdown table per question type (and per relation): n; a no-search baseline (always
    answer the type's most common gold: what can be guessed without reading); the retrieval
    bound (a gold answer in the top-`topk` BM25 passages for the question text: one search
    with the question itself); the share whose oracle queries find every hop's passage
    (`metadata.query_hits`, top-1: what the warm-start episodes can ground); and per model EM and average searches from `eval.run`'s
    prediction records (`models`: label -> {question id -> record}), blank until given."""
    from .qa_data import answer_in_topk

    models = dict(models) if models else {"untrained": {}, "SFT": {}, "SFT+RL": {}}
    groups: dict[str, list] = defaultdict(list)
    for r in rows:
        meta = r.get("metadata") or {}
        groups[meta.get("qtype", "?")].append(r)
        if by_relation:
            groups[f"{meta.get('qtype', '?')}: {meta.get('relation', '?')}"].append(r)
    groups["all"] = list(rows)
    head = (f"| type | n | no-search majority EM | gold in BM25 top-{topk} (question) | oracle queries find every hop |"
            + "".join(f" {m} EM / searches |" for m in models))  # fmt: skip
    lines = [head, "|---|---:|---:|---:|---:|" + "---:|" * len(models)]
    order = sorted(k for k in groups if ":" not in k and k != "all") + ["all"] + sorted(k for k in groups if ":" in k)
    for key in order:
        rs = groups[key]
        if not rs:
            continue
        common = Counter(_norm(r["golden_answers"][0]) for r in rs).most_common(1)[0][0]
        base = sum(any(_norm(g) == common for g in r["golden_answers"]) for r in rs) / len(rs)
        bound = answer_in_topk(rs, retriever, topk=topk)["fraction"]
        hits = [all(r["metadata"]["query_hits"]) for r in rs if (r.get("metadata") or {}).get("query_hits")]
        found = f"{sum(hits) / len(hits):.3f}" if hits else "-"
        cells = []
        for recs in models.values():
            got = [recs[r["id"]] for r in rs if r.get("id") in recs]
            cells.append(
                f" {sum(x['em'] for x in got) / len(got):.3f} / {sum(x['searches'] for x in got) / len(got):.2f} |"
                if got else " |"
            )
        name = f"**{key}**" if ":" not in key else key
        lines.append(f"| {name} | {len(rs)} | {base:.3f} | {bound:.3f} | {found} |" + "".join(cells))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.search.natural_qa", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="per-type counts, samples and the BM25 retrieval bounds of a generated set")
    r.add_argument("--data", required=True, help="directory with train/dev/test.jsonl")
    r.add_argument("--samples", type=int, default=0, help="print N sample questions per relation (test+dev)")
    r.add_argument("--topk", type=int, default=3)
    r.add_argument("--corpus", default=None, help="Search-R1 jsonl corpus (default: wiki10k from the cache)")
    r.add_argument("--split", default="test", help="the split the difficulty table is over (default: test)")
    r.add_argument("--predictions", action="append", default=[], metavar="LABEL=PATH",
                   help="eval.run prediction records (predictions/<model>__<dataset>.jsonl) of a model on that split: "
                        "fills the model's EM / searches columns (repeatable)")
    args = ap.parse_args(argv)
    from rl.common import read_jsonl

    from . import corpus as C
    from .retrievers import BM25Retriever

    d = Path(args.data)
    splits = {s: read_jsonl(d / f"{s}.jsonl") for s in ("train", "dev", "test") if (d / f"{s}.jsonl").exists()}
    print(json.dumps(type_report(splits), indent=1))
    if args.samples:
        by: dict[str, list] = defaultdict(list)
        for row in splits.get("test", []) + splits.get("dev", []) + splits.get("train", []):
            by[_type_key(row)].append(row)
        for k in sorted(by):
            print(f"\n## {k}")
            for row in by[k][: args.samples]:
                print(f"  {row['question']}  ->  {row['golden_answers']}   [{' | '.join(row['metadata']['titles'])}]")
    models = {}
    for item in args.predictions:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            ap.error(f"--predictions {item!r}: expected LABEL=PATH")
        models[label] = {str(rec.get("id")): rec for rec in read_jsonl(path)}
    if args.split not in splits:
        ap.error(f"--split {args.split}: no {d / (args.split + '.jsonl')}")
    retriever = BM25Retriever(args.corpus or C.fetch_wiki(), show_progress=False)
    print()
    print(difficulty_table(splits[args.split], retriever, topk=args.topk, models=models or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
