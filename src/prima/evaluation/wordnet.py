"""Finds WordNet for METEOR's synonym stage: nltk's own corpus, Debian's `wordnet-base` data, or none.

Debian's package puts the WordNet 3.0 database in /usr/share/wordnet but without the `lexnames`
file that nltk's reader opens first; that file is a fixed table of WordNet 3.0 (lexnames(5WN)), so
it is supplied from here. Without any WordNet, METEOR matches exact words and Porter stems only,
and the report says so.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from prima.errors import PrimaError

DEBIAN_WORDNET = Path("/usr/share/wordnet")

# lexnames(5WN) of WordNet 3.0: file number, name, syntactic category (1 noun, 2 verb, 3 adj, 4 adv).
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
LEXNAMES_TEXT = "".join(f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES))


class SynonymCache:
    """A WordNet reader as METEOR uses it, memoised: ``synsets(word)`` gives one stand-in synset whose
    lemmas are all the word's distinct single-word lemma names. METEOR only takes the set of those names, so its
    scores are unchanged; each word's synsets are read from WordNet once per process instead of once
    per answer.
    """

    def __init__(self, reader: Any):
        self.reader = reader
        self._memo: dict[str, list[_Synset]] = {}

    def synsets(self, word: str) -> list[_Synset]:
        out = self._memo.get(word)
        if out is None:
            # METEOR skips multi-word lemmas ("fall_guy"); leaving them out here changes nothing but time.
            names = dict.fromkeys(
                lemma.name() for s in self.reader.synsets(word) for lemma in s.lemmas() if "_" not in lemma.name()
            )
            out = self._memo[word] = [_Synset(tuple(_Lemma(n) for n in names))] if names else []
        return out

    def get_version(self) -> str:
        return self.reader.get_version()


@dataclass(frozen=True)
class _Lemma:
    _name: str

    def name(self) -> str:
        return self._name


@dataclass(frozen=True)
class _Synset:
    _lemmas: tuple[_Lemma, ...]

    def lemmas(self) -> tuple[_Lemma, ...]:
        return self._lemmas


@dataclass(frozen=True)
class MeteorResources:
    """The WordNet METEOR uses (a SynonymCache; None: exact + stem only) and a sentence saying which, for reports."""

    wordnet: Any
    description: str


def load_wordnet(spec: str | os.PathLike = "auto") -> MeteorResources:
    """WordNet for METEOR. ``spec``: "auto" (nltk_data, then Debian's), "none", or a WordNet dict folder."""
    spec = str(spec)
    if spec == "none":
        return MeteorResources(None, "exact + Porter-stem matching (WordNet switched off with --wordnet none)")
    if spec != "auto":
        return _cached(str(Path(spec).resolve()))
    try:
        import nltk.data

        nltk.data.find("corpora/wordnet")
    except LookupError:
        pass
    else:
        from nltk.corpus import wordnet

        version = wordnet.get_version()
        return MeteorResources(SynonymCache(wordnet), f"exact + Porter-stem + WordNet {version} synonyms (nltk_data)")
    if (DEBIAN_WORDNET / "data.noun").is_file():
        return _cached(str(DEBIAN_WORDNET))
    return MeteorResources(
        None,
        "exact + Porter-stem matching only: no WordNet found (install Debian's `wordnet-base` "
        "or nltk's `wordnet` corpus for synonym matching)",
    )


@lru_cache(maxsize=4)
def _cached(root: str) -> MeteorResources:
    """Reading the database takes seconds, so one reader per folder per process."""
    path = Path(root)
    if not (path / "data.noun").is_file():
        raise PrimaError(f"{path} is not a WordNet database folder (no data.noun); pass --wordnet auto or none")
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    # nltk only opens files under its data paths; a folder the user names joins them.
    if root not in nltk.data.path:
        nltk.data.path.append(root)
    has_lexnames = (path / "lexnames").is_file()

    class _Reader(WordNetCorpusReader):
        def open(self, file: str):  # noqa: A003 - nltk's method name
            if file == "lexnames" and not has_lexnames:
                return io.StringIO(LEXNAMES_TEXT)
            return super().open(file)

        def map_wn(self, version: str = "wordnet") -> None:
            return None  # the map to nltk's own WordNet serves multilingual lookups, which METEOR does not use

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": not needed here
        try:
            reader = _Reader(root, None)
        except (OSError, ValueError, AssertionError) as e:
            raise PrimaError(f"cannot read the WordNet database in {path}: {e}") from None
    source = "Debian wordnet-base" if path == DEBIAN_WORDNET else "local folder"
    description = f"exact + Porter-stem + WordNet {reader.get_version()} synonyms ({source}, {path})"
    return MeteorResources(SynonymCache(reader), description)
