"""Word lists for the sub-token divergence analysis of the multilingual comparison (docs/paper-notes.md §6).

A shared tokenizer gives a word spelled alike in two languages the same tokens; only context tells the model
which meaning it carries. v1 plots the sub-token divergence (distinct experts a token's H sub-tokens
reach) of such polysemous / false-cognate words against other words.

FALSE_COGNATES: word -> {language: meaning}: spelled alike, different meanings across the languages named
    (most are also polysemous within a language, e.g. en "kind", "will", "still").
CONTROL_WORDS: word -> {language: meaning}: spelled alike with the SAME meaning in the languages named (true
    cognates and loanwords), so a difference from them is not a matter of shared spelling.

Occurrences count only in the languages named (a word matched case-insensitively and whole, e.g. "Kind" in
German). Every entry was checked against the held-out (valid + test) text of the offline data pack's
multilingual folder (2026-11): each word occurs there in at least two of its languages, except those marked
"train only" (kept because they are the textbook examples; they count only if the user's data has them).
"""

from __future__ import annotations

FALSE_COGNATES: dict[str, dict[str, str]] = {
    "die": {"en": "to die (verb)", "de": "the (article)"},
    "was": {"en": "past of 'be'", "de": "what", "pl": "you (pronoun)"},
    "man": {"en": "man", "de": "one (pronoun)", "nb": "one (pronoun)"},
    "kind": {"en": "kind, sort; friendly", "de": "child"},
    "will": {"en": "future auxiliary; will (noun)", "de": "wants"},
    "war": {"en": "war", "de": "was"},
    "also": {"en": "too, as well", "de": "so, therefore"},
    "hat": {"en": "hat", "de": "has"},
    "art": {"en": "art", "de": "kind, type"},
    "fast": {"en": "quick", "de": "almost"},
    "still": {"en": "yet; motionless", "de": "quiet"},
    "gift": {"en": "present", "de": "poison", "nb": "married; poison"},
    "den": {"en": "den", "de": "the (accusative)", "nb": "it, the", "cs": "day"},
    "to": {"en": "to (preposition)", "pl": "it, this", "cs": "it, this"},
    "come": {"en": "to come", "it": "how, like"},
    "son": {"en": "son", "es": "(they) are", "fr": "his, her; sound"},
    "pour": {"en": "to pour", "fr": "for"},
    "car": {"en": "car", "fr": "because"},
    "sin": {"en": "sin", "es": "without", "nb": "his, her (own)"},
    "pan": {"en": "pan", "es": "bread", "pl": "Mr, sir"},
    "na": {"pl": "on", "cs": "on", "pt": "in the (feminine)"},
    "as": {"en": "as", "pt": "the (feminine plural)"},
    "os": {"en": "OS (operating system)", "pt": "the (masculine plural)"},
    "red": {"en": "red", "es": "network"},
    "data": {"en": "data", "it": "date", "pl": "date", "pt": "date"},
    "actual": {"en": "real", "es": "current", "ca": "current"},
    "tot": {"ca": "all", "de": "dead"},
    "burro": {"es": "donkey", "it": "butter"},  # train only
}

CONTROL_WORDS: dict[str, dict[str, str]] = {
    "hand": {"en": "hand", "de": "hand"},
    "name": {"en": "name", "de": "name"},
    "problem": {"en": "problem", "de": "problem", "pl": "problem", "nb": "problem"},
    "system": {"en": "system", "de": "system", "nb": "system", "pl": "system"},
    "server": {"en": "server", "de": "server", "id": "server", "it": "server", "nb": "server", "pl": "server"},
    "software": {"en": "software", "de": "software", "es": "software", "it": "software", "pt": "software"},
    "internet": {"en": "internet", "de": "internet", "es": "internet", "it": "internet", "ca": "internet"},
    "kernel": {"en": "kernel", "de": "kernel", "id": "kernel", "it": "kernel", "pt": "kernel"},
    "administrator": {"en": "administrator", "de": "administrator", "id": "administrator", "nb": "administrator"},
    "program": {"en": "program", "id": "program", "nb": "program", "pl": "program"},
    "version": {"en": "version", "de": "version", "fr": "version"},
    "computer": {"en": "computer", "de": "computer", "it": "computer"},
    "general": {"en": "general", "es": "general", "ca": "general"},
    "idea": {"en": "idea", "es": "idea", "it": "idea", "ca": "idea", "pl": "idea"},
    "normal": {"en": "normal", "de": "normal", "es": "normal", "pt": "normal", "id": "normal"},
    "format": {"en": "format", "de": "format", "fr": "format", "ca": "format", "id": "format"},
    "moment": {"en": "moment", "de": "moment", "fr": "moment", "ca": "moment"},
}


def words_for(table: dict[str, dict[str, str]], lang: str) -> list[str]:
    """The words of `table` that count in language `lang`."""
    return [word for word, meanings in table.items() if lang in meanings]
