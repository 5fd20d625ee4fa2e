"""PTB tokenization of captions in process: what pycocoevalcap's ``PTBTokenizer`` returns, without Java.

pycocoevalcap tokenizes every caption the COCO metrics see with Stanford CoreNLP 3.4.1's ``PTBTokenizer``
(``java ... PTBTokenizer -preserveLines -lowerCase``, one caption a line, each ``"\\n"`` in a caption first
replaced by a space), then drops the tokens in its ``PUNCTUATIONS`` list and joins the rest with spaces.
:func:`ptb_tokenize_all` gives the same strings for the same captions; :func:`ptb_tokenize` does it for one
caption, as a call with that caption alone would.

How: CoreNLP's tokenizer is a JFlex scanner (``PTBLexer.flex`` at tag ``v3.4.1``); its rules are written here
as Python regular expressions, in the same order, with JFlex's choice among them: the longest match wins,
counting trailing context (``r1/r2``), and the earlier rule wins a tie. Its options are those the command line
sets: PTB escaping on except ``americanize`` and the escaping of ``/`` and ``*``; assimilations split.
Captions are cut at spaces into chunks, and each chunk's words are cached, keyed by the chunk and the few facts
about what follows it that a rule can see (the next character; after a period, also whether a listed
capitalised word, a digit or "ltd" comes next), so the slow scanner (~40 µs a token) runs only on chunks not
seen before. Captions where a token could span a space (dotted ellipses ``. . .``, a digit after a digit or
``)``, an SGML tag, a space other than " " or tab) are scanned whole.

What comes out, as with Java (``tests/test_ptb.py`` checks 195 constructed captions against the real
tokenizer; during development, about 100,000 generated ones — caption-like text, dense random punctuation and
symbols, abbreviations and numbers around spaces and blank captions — matched it without exception):

* lower case; ``. , ; : ! ? ' '' ` `` - -- ...`` dropped, but not runs of them that form another token
  (``?!``, ``!!``, ``-----``);
* parentheses become ``-lrb-`` and ``-rrb-``, square brackets ``-lsb-``/``-rsb-``, braces ``-lcb-``/``-rcb-``:
  lower-cased by Java before pycocoevalcap compares them with its upper-case list, so none is dropped;
* clitics split: ``don't`` → ``do n't``, ``it's`` → ``it 's``, ``cats'`` → ``cats '`` (dropped ``'``);
  ``cannot`` → ``can not``, ``gonna``/``gotta``/``wanna``/``gimme``/``lemme`` → ``gon na`` ...;
* hyphenated words, ``and/or``, ``1,000``, ``3.5``, ``10:30``, ``a.m.``, ``mr.``, ``u.s.`` and other listed
  abbreviations stay whole (``a.`` at a caption's end stays ``a.``; before one of a list of capitalised words
  — ``The``, ``A``, ... — also at the start of the next caption, it becomes ``a``);
* ``$5`` → ``$ 5``, ``50%`` → ``50 %``, ``&`` and ``/`` alone are tokens, ``"`` → dropped quotes, ``—``/``–``
  → ``--`` (dropped), ``…`` → ``...`` (dropped); ``½`` → ``1/2``; ``1 1/2`` → one token with a no-break
  space; ``:)`` → ``:-rrb-`` (but ``-rrb-`` at the very end of the input); characters the scanner does not
  know (emoji, control characters) are deleted.

Known differences, all deliberate:

* A line break inside a caption other than ``"\\n"`` (``"\\r"``, ``"\\v"``, ``"\\f"``, U+2028, U+2029) is a
  space here. pycocoevalcap passes it to Java, which starts a new output line there: that caption loses its
  tail and every later caption of the call gets its neighbour's tokens. (``"\\r"`` at a caption's very end
  merges with the line's ``"\\n"`` and changes nothing, here or there.)
* An SGML tag whose quoted attribute runs over a line break (``<a b="x``, next caption ``y">``) is one
  token in Java, spanning two captions; here each caption stops at its end.
* Letters, digits and upper case follow Python's Unicode tables, not the Java 6 tables JFlex compiled the
  scanner with: characters added to Unicode since (some scripts, symbols) may be letters here and deleted
  there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from functools import cache

PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
"""pycocoevalcap's list of tokens to drop (compared after Java lower-cases tokens: the bracket names never
match)."""

# ---------------------------------------------------------------------------------------------------------
# The scanner: PTBLexer.flex (CoreNLP v3.4.1) as Python regular expressions.
#
# JFlex's %caseless makes literal text case-insensitive but not character classes, so literals are wrapped in
# (?ai:...) (ASCII-only case folding, as JFlex does for these letters) and classes are left as they are.
# Macros are written {NAME} and expanded by _expand; {2,4}-style counts are left alone.

_MACROS: dict[str, str] = {
    "SPACE": r"[ \t\u00A0\u2000-\u200A\u3000]",
    "SPACENL": r"(?:[ \t\u00A0\u2000-\u200A\u3000]|\r\n|[\r\n\u2028\u2029\x0b\x0c\x85])",
    "SGML": (
        r"<(?:[!?][A-Za-z-][^>\r\n]*"
        r"|[A-Za-z][A-Za-z0-9_:.-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")"
        r"|[A-Za-z][A-Za-z0-9_:.-]*))*[ ]*/?"
        r"|/[A-Za-z][A-Za-z0-9_:.-]*)[ ]*>"
    ),
    "SPLET": r"&[aeiouAEIOU](?ai:acute|grave|uml);",
    "APOS": r"(?:['\x92\u2019]|&(?ai:apos);)",
    "APOSETC": r"(?:['\x92\u2019`\x91\u2018\u201B]|&(?ai:apos);)",
    "HYPHEN": r"[-_\u058A\u2010\u2011]",
    "INSENTP": r"[,;:\u3001]",
    "ACRO1": r"[A-Za-z](?:\.[A-Za-z])*",
    "ACRO1PLUS": r"[A-Za-z](?:\.[A-Za-z])+",
    "ACRO2": r"(?ai:canada|sino|korean|eu|japan|non)-(?ai:u\.s)",
    "ACRO3": r"(?ai:u\.s\.-(?:u\.k|u\.s\.s\.r))",
    "DBLQUOT": r"(?:\"|&(?ai:quot);)",
    "REDAUX": r"(?:['\x92\u2019]|&(?ai:apos);)(?:[msdMSD]|(?ai:re|ve|ll))",
    "SREDAUX": r"(?ai:n)(?:['\x92\u2019`\x91\u2018\u201B]|&(?ai:apos);)(?ai:t)",
    "URLPATH": r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])",
    "ABBREV1": (
        r"(?:(?ai:jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec)"  # months
        r"|(?ai:mon|tue|tues|wed|thu|thurs|fri)"  # days
        r"|(?ai:ala|ariz)|A(?ai:z)|A(?ai:rk)|(?ai:calif|colo|conn|ct|dak)|D(?ai:el)|(?ai:fla|ga)|I(?ai:ll)"
        r"|(?ai:ind|kans?|ky)|L(?ai:a)|M(?ai:ass)|(?ai:md|mich|minn)|M(?ai:iss)|(?ai:mo|mont|neb|nev|okla)"
        r"|O(?ai:re)|P(?ai:a)|(?ai:penn|tenn)|T(?ai:ex)|(?ai:va|vt)|W(?ai:ash)|(?ai:wisc?|wyo)"  # states
        r"|(?ai:pp?t)[ye](?ai:s)?|(?ai:inc|cos?|corp|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys)"  # companies
        r"|(?ai:tel|est|ext|sq)|(?ai:jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq)|(?ai:etc|al|seq|bldg))\."
    ),
    "ABBREV4WORD": (
        r"(?:(?ai:mr|mrs|ms)|M(?ai:iss)|(?ai:drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev"
        r"|maj|sgt|cpl|pvt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst"
        r"|assoc|ens|insp|mlle|mme|msgr|sfc)"  # titles
        r"|(?ai:vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph)"
        r"|(?ai:invt|elec|natl)|(?ai:m)[ft](?ai:g)|(?ai:dept))"
    ),
    "ACROWORDS": (
        r"(?:A(?ai:bout|ccording|dditionally|fter|n|s|t)?|B(?ai:ut)|E(?ai:arlier)|H(?ai:e|er|ere|owever)"
        r"|I(?ai:f|n|t)|L(?ai:ast)|M(?ai:any|ore|r\.|s\.)|N(?ai:ow)|O(?ai:nce|ne|ther|ur)"
        r"|S(?ai:he|ince|o|ome|uch)|T(?ai:hat|he|heir|hen|here|hese|hey|his)|W(?ai:e|hen|hile|hat)"
        r"|Y(?ai:et|ou))"
    ),
    "PHONESEP": r"[- \u00A0]",
}


def _expand(pattern: str, macros: dict[str, str]) -> str:
    """Replaces each ``{NAME}`` of ``macros`` in ``pattern`` (recursively), leaving ``{m,n}`` counts alone."""
    expanded = re.sub(r"\{([A-Z][A-Z0-9]*)\}", lambda m: macros[m.group(1)], pattern)
    return expanded if expanded == pattern else _expand(expanded, macros)


def _char_class(characters: Iterable[str]) -> str:
    """The body of a regex character class holding exactly ``characters`` (as ranges of code points)."""
    codes = sorted({ord(c) for c in characters})
    parts: list[str] = []
    start = previous = codes[0]
    for code in [*codes[1:], -1]:
        if code != previous + 1:
            parts.append(f"\\u{start:04x}" if start == previous else f"\\u{start:04x}-\\u{previous:04x}")
            start = code
        previous = code
    return "".join(parts)


# Characters JFlex's LETTER macro adds to [:letter:] (combining marks and others Java 6 did not call letters).
_EXTRA_LETTERS = (
    r"\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D\u0384\u0385"
    r"\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525\u055A-\u055F\u0591-\u05BD"
    r"\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F\u064B-\u065E\u0670\u06D6-\u06EF"
    r"\u06FA-\u06FF\u070F\u0711\u0730-\u074F\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903"
    r"\u093C\u093E-\u094E\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD"
    r"\u09D7\u09E2\u09E3\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2"
    r"\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A"
    r"\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD"
)

_MISC_SYMBOLS = (
    r"+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u0387\u05BE"
    r"\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D"
    r"\u0703-\u070D\u07F6\u07F7\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B"
    r"\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB"
    r"\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65"
)

_LEFT_SINGLE = re.compile("[\x91\u2018\u201b\u2039]")
_RIGHT_SINGLE = re.compile("[\x92\u2019\u203a]")
_LEFT_DOUBLE = re.compile("[\x93\u201c\u00ab]")
_RIGHT_DOUBLE = re.compile("[\x94\u201d\u00bb]")
_SINGLE_QUOTE = re.compile("&apos;|'")
_DOUBLE_QUOTE = re.compile('"|&quot;')
_AMP_ENTITY = re.compile("(?ai:&amp;)")


def _latex_quotes(text: str, probably_left: bool) -> str:
    """PTBLexer's ``latexQuotes``: straight and curly quotes to the LaTeX-style ones PTB uses."""
    text = _SINGLE_QUOTE.sub("`" if probably_left else "'", text)
    text = _DOUBLE_QUOTE.sub("``" if probably_left else "''", text)
    text = _LEFT_SINGLE.sub("`", text)
    text = _RIGHT_SINGLE.sub("'", text)
    text = _LEFT_DOUBLE.sub("``", text)
    return _RIGHT_DOUBLE.sub("''", text)


def _without_soft_hyphens(text: str) -> str:
    return (text.replace("\u00ad", "") or "-") if "\u00ad" in text else text


def _brackets(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\x80": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}


class _Special(Enum):
    """Rule actions other than rewriting the token's text."""

    SKIP = "no token"  # spaces, line breaks, characters no rule knows
    PERIOD_AGAIN = "the token keeps its final period, which is scanned again (and dropped as punctuation)"
    ACRONYM = "as PERIOD_AGAIN, except that a one-letter acronym gives the letter alone"


@dataclass(frozen=True)
class _Rule:
    """One scanner rule: alternative regexes (the longest match among them counts), its action, and how many
    characters of the match are given back to be scanned again (``cannot`` → ``can`` + ``not``).

    Regexes with trailing context put the token in group 1; the rest of the match is the context, which
    counts for the longest match but is scanned again.
    """

    regexes: tuple[re.Pattern[str], ...]
    action: Callable[[str], str] | _Special
    give_back: int = 0


def _keep(text: str) -> str:
    return text


@cache
def _macros() -> dict[str, str]:
    """All macros, with the Unicode letter and upper-case classes built on first use (~20 ms)."""
    bmp = "".join(map(chr, range(0x10000)))
    letters = [c for c in re.findall(r"[^\W\d_]", bmp) if c.isalpha()]
    macros = dict(_MACROS)
    macros["RL"] = _char_class(letters)  # JFlex [:letter:]
    macros["LC"] = macros["RL"] + _EXTRA_LETTERS  # the LETTER macro, less its SPLET entities
    macros["UPPER"] = "[" + _char_class(c for c in bmp if c.isupper()) + "]"
    macros["LETTER"] = r"(?:[{LC}]|{SPLET})"
    macros["WORD"] = r"{LETTER}(?:[{LC}\d]|{SPLET})*(?:[.!?]{LETTER}(?:[{LC}\d]|{SPLET})*)*"
    macros["THING"] = (
        r"(?:[dDoOlL]{APOSETC}[{RL}\d])?[{RL}\d]+(?:{HYPHEN}(?:[dDoOlL]{APOSETC}[{RL}\d])?[{RL}\d]+)*"
    )
    macros["THINGA"] = r"[A-Z]+(?:(?:[+&]|&(?ai:amp);)[A-Z]+)+"
    macros["HTHING"] = (
        r"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:{ACRO3}\.|{ACRO2}\.|{ACRO1PLUS}\.|[A-Za-z0-9\u00AD]+))+"
    )
    macros["SENTEND"] = "{SPACENL}(?:{SPACENL}|{UPPER}|{SGML})"
    return macros


@cache
def _rules() -> tuple[_Rule, ...]:
    """The scanner's rules in PTBLexer.flex's order, compiled on first use (~0.1 s)."""
    macros = _macros()

    def rule(*patterns: str, action: Callable[[str], str] | _Special = _keep, give_back: int = 0) -> _Rule:
        return _Rule(tuple(re.compile(_expand(p, macros)) for p in patterns), action, give_back)

    def fixed(text: str) -> Callable[[str], str]:
        return lambda _: text

    acro_alternatives = ("{ACRO3}", "{ACRO2}", "{ACRO1}")
    return (
        rule(r"(?ai:c)\+\+"),
        rule(r"(?ai:c|f)#"),
        rule(r"(?ai:cannot)", give_back=3),
        rule(r"'(?ai:twas)", give_back=3),
        rule(r"'(?ai:tis)", give_back=2),
        rule(r"(?ai:gonna|gotta|lemme|gimme|wanna)", give_back=2),
        rule(r"{SGML}", action=lambda t: t.replace(" ", "\u00a0")),
        rule(r"&(?ai:md|mdash|ndash);|[\x96\x97\u2013\u2014\u2015]", action=fixed("--")),
        rule(r"&(?ai:amp);", action=lambda t: _AMP_ENTITY.sub("&", t)),
        rule(r"&(?:(?ai:ht|tl|ur|lr|qc|ql|qr|odq|cdq)|#[0-9]+);"),
        rule(r"({WORD}){REDAUX}", action=_without_soft_hyphens),
        rule(r"([A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*){SREDAUX}", action=_without_soft_hyphens),
        rule(r"{WORD}", action=_without_soft_hyphens),
        rule(  # APOWORD
            r"{APOS}(?ai:n){APOS}?",
            r"[lLdDjJ]{APOS}",
            r"(?ai:dunkin|somethin|ol){APOS}",
            r"{APOS}(?ai:em|till?|cause)",
            r"[A-HJ-XZn]{APOSETC}[{RL}]{2,}",
            r"{APOS}[2-9]0(?ai:s)",
            r"[{RL}]+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z][{RL}]*",
            r"(?ai:cont'd)\.?",
            r"(?ai:'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)",
            r"(?ai:o){APOSETC}(?ai:o)",
        ),
        rule(r"((?ai:y){APOS})[{RL}]"),
        rule(r"(?ai:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]"),
        rule(  # LIKELYURL
            r"(?ai:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}{URLPATH}?",
            r"(?:[^ \t\n\f\r\"`'<>|.!?(){}\x2c-\x5f$]+\.)+(?ai:com|net|org|edu){URLPATH}?",
        ),
        rule(  # EMAIL
            r"(?:&(?ai:lt);|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
            r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&(?ai:gt);|>)?"
        ),
        rule(r"@[a-zA-Z_][a-zA-Z_0-9]*", r"#{LETTER}+"),  # TWITTER
        rule(r"({REDAUX})[^A-Za-z]", action=lambda t: _latex_quotes(t, False)),
        rule(r"({SREDAUX})[^A-Za-z]", action=lambda t: _latex_quotes(t, False)),
        rule(r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}"),  # DATE
        rule(r"[-+]?(?:\d*(?:[.:,\u00AD\u066B\u066C]\d+)+|\d+)", action=_without_soft_hyphens),  # NUMBER
        rule(r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)"),
        rule(
            r"(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", action=lambda t: t.replace(" ", "\u00a0")
        ),
        rule(r"[\u00BC\u00BD\u00BE\u2153-\u215E]", action=lambda t: _FRACTIONS.get(t, t)),
        rule(  # TBSPEC
            r"-(?ai:rrb|lrb|rcb|lcb|rsb|lsb)-",
            r"(?ai:c\.d\.s|pro-|anti-)",
            r"(?ai:s)(?:&|&(?ai:amp);)(?ai:p-500|ls)",
            r"(?ai:cap){APOS}(?ai:n)",
            r"(?ai:c){APOS}(?ai:est)",
            action=lambda t: _AMP_ENTITY.sub("&", t),
        ),
        rule(r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"),  # THING3
        rule(r"[A-Z]*\$|#"),
        rule(
            r"[\u00A2\u00A3\u00A4\u00A5\x80\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]",
            action=lambda t: _CURRENCY.get(t, t),
        ),
        rule(
            *(rf"({acro}\.){{SPACENL}}+(?:{{ACROWORDS}}|{{SGML}}){{SPACENL}}" for acro in acro_alternatives),
            action=_Special.ACRONYM,
        ),
        rule(r"((?ai:ca|figs?|prop|nos?|art|bldg|pp|op)\.){SPACENL}?\d"),  # ABBREV3 before a number
        rule(r"((?ai:pt)[eyEY]\.|(?ai:co)\.){SPACE}(?ai:ltd|lim)"),
        rule(r"({ABBREV1}){SENTEND}", action=_Special.PERIOD_AGAIN),
        rule(r"({ABBREV1})[\s\S]{2}"),
        rule(r"{ABBREV1}", action=_Special.PERIOD_AGAIN),
        rule(r"{ABBREV4WORD}\.", *(rf"{acro}\." for acro in acro_alternatives)),  # ABBREV2
        rule(r"({ABBREV4WORD}){SPACE}", *(rf"({acro}){{SPACE}}" for acro in acro_alternatives)),
        rule(*(rf"({acro}){{SPACENL}}" for acro in acro_alternatives)),
        rule(r"({APOS}[0-9][0-9]){SPACENL}"),  # TBSPEC2
        rule(  # FILENAME
            r"((?:[{LC}\d]|{SPLET})+(?:\.(?:[{LC}\d]|{SPLET})+)*\.(?ai:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe"
            r"|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip))"
            r"(?:{SPACENL}|[.?!,])"
        ),
        rule(r"({WORD}\.){INSENTP}", action=_without_soft_hyphens),
        rule(  # PHONE
            r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}{PHONESEP})?[0-9]{2,4}{PHONESEP})[0-9]{3,4}"
            r"{PHONESEP}?[0-9]{3,5}",
            r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}",
            action=lambda t: _brackets(t.replace(" ", "\u00a0")),
        ),
        rule(r"({DBLQUOT})[A-Za-z0-9$]", action=lambda t: _latex_quotes(t, True)),
        rule(r"{DBLQUOT}", action=lambda t: _latex_quotes(t, False)),
        rule(r"\x7f", action=_Special.SKIP),
        rule(r"<|&(?ai:lt);", action=fixed("<")),
        rule(r">|&(?ai:gt);", action=fixed(">")),
        rule(r"([<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]])[^A-Za-z0-9]", action=_brackets),  # SMILEY
        rule(  # ASIANSMILEY
            r"[\^x=~<>]\.\[\^(?ai:x)=~<>\]",
            r"[-\^x=~<>']_[-\^x=~<>']",
            r"\([-\^x=~<>'][_.]?[-\^x=~<>']\)",
            r"\([\^x=~<>']-[\^x=~<>'`]\)",
            action=_brackets,
        ),
        rule(r"\{", action=fixed("-LCB-")),
        rule(r"\}", action=fixed("-RCB-")),
        rule(r"\[", action=fixed("-LSB-")),
        rule(r"\]", action=fixed("-RSB-")),
        rule(r"\(", action=fixed("-LRB-")),
        rule(r"\)", action=fixed("-RRB-")),
        rule(r"-+", action=lambda t: "--" if 3 <= len(t) <= 4 else t),
        rule(r"\.{3,5}", r"(?:\.[ \u00A0]){2,4}\.", r"[\x85\u2026]", action=fixed("...")),
        rule(r"@+|#+|_+"),
        rule(r"\*+|(?:\\\*){1,3}"),
        rule(r"{INSENTP}"),
        rule(r"[?!]+"),
        rule(r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]"),
        rule(r"="),
        rule(r"/"),
        rule(r"({HTHING}\.){INSENTP}", action=_without_soft_hyphens),
        rule(r"{HTHING}", action=_without_soft_hyphens),
        rule(r"({THING}\.){INSENTP}"),
        rule(r"{THING}"),
        rule(r"({THINGA}\.){INSENTP}", action=lambda t: _AMP_ENTITY.sub("&", t)),
        rule(r"{THINGA}", action=lambda t: _AMP_ENTITY.sub("&", t)),
        rule(r"(')[A-Za-z][^ \t\n\r\u00A0]", action=lambda t: _latex_quotes(t, True)),
        rule(r"{REDAUX}", action=lambda t: _latex_quotes(t, False)),
        rule(r"{SREDAUX}", action=lambda t: _latex_quotes(t, False)),
        rule(  # QUOTES
            r"{APOS}",
            r"''",
            r"[`\u2018\u2019\u201A\u201B\u201C\u201D\x91\x92\x93\x94\u201E\u201F\u2039\u203A\u00AB\u00BB]{1,2}",
            action=lambda t: _latex_quotes(t, False),
        ),
        rule(r"<<|>>"),
        rule(f"[{_MISC_SYMBOLS}]"),
        rule(r"\x00|{SPACE}+|[\u200B\u200E\u200F\uFEFF]", action=_Special.SKIP),
        # Line breaks: pycocoevalcap's lines are one a caption, so those inside a caption are spaces here.
        rule(r"\r\n|[\r\n\u2028\u2029\x0b\x0c\x85]", action=_Special.SKIP),
        rule(r"&(?ai:nbsp);", action=_Special.SKIP),
        rule(r".", action=_Special.SKIP),  # untokenizable: deleted
    )


def _scan(text: str, stop: int) -> list[str]:
    """The tokens, as Java writes them before lower-casing, that start before ``stop`` in ``text``.

    ``text[stop:]`` is what follows (the rest of the caption and the next ones): rules may look into it.
    """
    rules = _rules()
    tokens: list[str] = []
    position = 0
    while position < stop:
        best_length, best_rule, best_token_end = 0, rules[-1], position + 1
        for candidate in rules:
            for regex in candidate.regexes:
                match = regex.match(text, position)
                if match is not None and match.end() - position > best_length:
                    best_length = match.end() - position
                    best_rule = candidate
                    best_token_end = match.end(1) if regex.groups else match.end()
        token = text[position:best_token_end]
        position = best_token_end
        if best_rule.give_back:
            token = token[: -best_rule.give_back]
            position -= best_rule.give_back
        action = best_rule.action
        if action is _Special.SKIP:
            continue
        if action is _Special.ACRONYM and len(token) == 2:
            token = token[0]
            position -= 1
        elif action is _Special.ACRONYM or action is _Special.PERIOD_AGAIN:
            position -= 1
        elif callable(action):
            token = action(token)
        tokens.append(token)
    return tokens


# ---------------------------------------------------------------------------------------------------------
# pycocoevalcap's side, and the cached fast path.

_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _utf16(match: re.Match[str]) -> str:
    code = ord(match.group()) - 0x10000
    return chr(0xD800 + (code >> 10)) + chr(0xDC00 + (code & 0x3FF))


def _finish(raw_tokens: Iterable[str]) -> list[str]:
    """Java's ``-lowerCase`` and pycocoevalcap's punctuation filter."""
    return [word for word in (token.lower() for token in raw_tokens) if word not in PUNCTUATIONS]


def _scan_line(text: str, tail: str) -> list[str]:
    """The words of a whole caption line, scanned without the cache."""
    if _ASTRAL.search(text) or _ASTRAL.search(tail):
        # Java reads UTF-16: a character beyond U+FFFF is two surrogates, which only URL-like rules take in.
        surrogates = _ASTRAL.sub(_utf16, text)
        tokens = _scan(surrogates + _ASTRAL.sub(_utf16, tail), len(surrogates))
        tokens = [token.encode("utf-16", "surrogatepass").decode("utf-16", "replace") for token in tokens]
    else:
        tokens = _scan(text + tail, len(text))
    # pycocoevalcap strips the line's end: a URL token may end in a no-break space.
    return _finish(" ".join(tokens).rstrip().split(" ")) if tokens else []


# Captions scanned whole, not chunk by chunk, because a token could span a space there or see past the next
# character: spaces other than " " and tab, line breaks, SGML, ". . .", a digit after a space after a digit or
# ")" (fractions, phone numbers), characters beyond U+FFFF.
_WHOLE_LINE = re.compile(
    r"[<>\r\x0b\x0c\x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ud800-\udfff"
    r"\U00010000-\U0010ffff]"
    r"|\. \. \.|[\d)][ \t]+\d"
)


@cache
def _after_period() -> tuple[re.Pattern[str], ...]:
    """What a chunk ending in a period can see beyond its space: an acronym's capitalised next word, a number
    after "fig.", "ltd" after "co.", the start of a sentence."""
    return tuple(
        re.compile(_expand(pattern, _macros()))
        for pattern in (
            r"{SPACENL}+(?:{ACROWORDS}|{SGML}){SPACENL}",
            r"{SPACENL}?\d",
            r"{SPACE}(?ai:ltd|lim)",
            r"{SENTEND}",
        )
    )


_CACHE_LIMIT = 1 << 18
# Words of chunks followed by a space (most of them), and of the others keyed by what they can see after.
_before_space: dict[str, tuple[str, ...]] = {}
_in_context: dict[tuple[str, ...], tuple[str, ...]] = {}


def _scan_chunk(cache: dict, key: str | tuple[str, ...], chunk: str, after: str) -> tuple[str, ...]:
    """Scans a chunk not in ``cache`` and stores its words there (emptying a full cache first)."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    words = cache[key] = tuple(_finish(_scan(chunk + after, len(chunk))))
    return words


def _chunk_words(chunk: str, after: str) -> tuple[str, ...]:
    """The words of one chunk (no space inside) followed by ``after`` (its space or line break and all that
    follows, or nothing at the end of the input)."""
    key: tuple[str, ...]
    if chunk[-1] == ".":
        # Only tokens ending in a period have rules that look further than the next character.
        key = (
            chunk,
            after[:1],
            "2" if len(after) > 1 else "",
            *("1" if regex.match(after) else "" for regex in _after_period()),
        )
    elif after[:1] == " ":
        words = _before_space.get(chunk)
        return _scan_chunk(_before_space, chunk, chunk, " ") if words is None else words
    else:
        key = (chunk, after[:1])
    words = _in_context.get(key)
    return _scan_chunk(_in_context, key, chunk, after) if words is None else words


def _line_words(text: str, tail: str) -> list[str]:
    """The words of one caption line; ``tail`` is what Java reads after it ("" at the end of the input)."""
    if _WHOLE_LINE.search(text):
        return _scan_line(text, tail)
    if "\t" in text:
        text = text.replace("\t", " ")
    chunks = text.split(" ")
    last = len(chunks) - 1
    words: list[str] = []
    for index, chunk in enumerate(chunks):
        if not chunk:
            continue
        if chunk[-1] == ".":
            after = (" " + " ".join(chunks[index + 1 :]) if index < last else "") + tail
            words += _chunk_words(chunk, after)
        elif index < last:
            cached = _before_space.get(chunk)  # the common case, inlined
            words += _chunk_words(chunk, " ") if cached is None else cached
        else:
            words += _chunk_words(chunk, tail[:1])
    return words


def ptb_tokenize(caption: str) -> str:
    """One caption as pycocoevalcap's ``PTBTokenizer`` returns it when given that caption alone.

    Args:
        caption: raw text, any case, any punctuation.

    Returns:
        The lower-case tokens joined by single spaces, punctuation dropped ("" when nothing is left).
    """
    return " ".join(_line_words(caption.replace("\n", " "), ""))


def ptb_tokenize_all(captions: Iterable[str]) -> list[str]:
    """Captions as pycocoevalcap's ``PTBTokenizer`` returns them when given all of them in one call.

    A caption's tokens can depend on the start of the next one (``letter a.`` before ``The ...``), which is why
    this is not quite :func:`ptb_tokenize` on each caption.

    Args:
        captions: raw captions, in the order Java would read them.

    Returns:
        One tokenized string per caption, in order.
    """
    lines = [caption.replace("\n", " ") for caption in captions]
    results = []
    for index, line in enumerate(lines):
        # What Java reads next, as far as a rule can look: past blank lines to the first word and the
        # character after it (the next line break when the word is the whole line).
        tail = ""
        following = index + 1
        while following < len(lines):
            tail += "\n" + lines[following]
            following += 1
            if tail.strip():
                if following < len(lines):
                    tail += "\n"
                break
        results.append(" ".join(_line_words(line, tail)))
    return results
