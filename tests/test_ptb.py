"""In-process PTB tokenization (``clipcap.metrics.ptb``) against pycocoevalcap's ``PTBTokenizer`` (Stanford
CoreNLP 3.4.1 through Java) on constructed captions, one Java call for all of them; hand-checked outputs and
the cached path against the plain scanner need no Java."""

from __future__ import annotations

import shutil

import pytest

from clipcap.metrics import ptb
from clipcap.metrics.ptb import ptb_tokenize, ptb_tokenize_all

COCO_LIKE = [
    "A man riding a wave on top of a surfboard.",
    "A group of people standing around a kitchen",
    "Two dogs playing in the snow, one with a frisbee.",
    "a cat sitting on top of a wooden bench",
    "A woman is holding an umbrella in the rain.",
    "The giraffe is eating leaves from a tall tree.",
    "A red double-decker bus driving down a city street.",
    "Several zebras grazing in a grassy field",
    "An elderly couple sitting on a park bench together.",
    "A plate of food with broccoli, carrots, and rice.",
    "A little girl brushing her teeth in the bathroom.",
    "A black and white photo of a clock tower.",
    "a pizza with pepperoni , mushrooms and olives .",
    "Three surfers walking along the beach at sunset!",
    "Is this a kitchen or a living room?",
    "A young boy swinging a baseball bat at a ball",
    "A train pulling into a station next to a platform.",
    "A bathroom with a toilet, sink, and shower.",
    "A laptop computer sitting on a desk next to a mouse.",
    "A herd of elephants walking across a dirt road.",
    "People are skiing down a snowy hill.",
    "A stop sign on the corner of an empty street.",
    "A kite flying high in the blue sky above the beach.",
    "A man in a suit and tie standing in front of a building.",
    "Two teddy bears sitting next to each other on a bed.",
    "A bowl of fruit containing apples, bananas and oranges.",
    "A horse-drawn carriage on a cobblestone street.",
    "A person on a motorcycle rides down the highway.",
    "A fire hydrant on the side of a road.",
    "The sheep are standing in a fenced-in area.",
    "A tennis player swings her racket to hit the ball.",
    "A cup of coffee and a donut on a table.",
    "A baby elephant follows its mother through the grass.",
    "a couple of people that are flying kites",
    "A bird perched on a branch of a tree.",
    "A living room filled with furniture and a television.",
    "Cars are parked along the side of the road.",
    "A skateboarder does a trick on a ramp.",
    "an airplane flying over a city at night",
    "A sandwich cut in half on a white plate.",
    "A dog lying on a couch next to a remote control.",
    "A boat docked at a pier on a cloudy day.",
    "A woman cutting a cake at a party.",
    "Two men playing frisbee in a park.",
    "A polar bear swimming in the water.",
    "A vase filled with yellow flowers on a table.",
    "A street sign that reads Main St. next to a traffic light.",
    "Some motorcycles are parked in a row",
    "A large passenger jet sitting on top of an airport tarmac.",
    "A child holding a stuffed animal while sleeping.",
]

PUNCTUATION_AND_QUOTES = [
    "A dog.",
    "A dog!",
    "A dog?",
    "A dog...",
    "A dog.. ",
    "A dog . . . and a cat",
    "Wow!! What a view?!",
    "A cat; a dog: a bird",
    'A sign that says "STOP".',
    'The shirt reads "I love NY" in red letters.',
    "A sign that says 'no parking' on a pole.",
    "A ``quoted'' word and a `single' one",
    "A “fancy” sign with ‘curly’ quotes",
    "The word «bonjour» on a wall",
    "A man (wearing a hat) walks by.",
    "A bowl of soup (with noodles)",
    "Two [blue] boxes and {three} bags",
    "A man - wearing a red shirt - runs",
    "A man -- wearing a red shirt -- runs",
    "A dash---three of them----and five-----here",
    "A dash — em and – en",
    "An ellipsis … here",
    "A smiling face :) drawn on a board",
    "A sad face :( and a wink ;)",
    "A keyboard with the keys ^_^ and (-_-)",
    "A sign with an arrow -> pointing left",
    "A*star and a #hashtag and @someone",
    "Equals = plus + and tilde ~",
    "A backslash \\ and a pipe |",
    "A dog,a cat,and a bird",
    "A dog.A cat.",
    "End of sentence.Next sentence",
]

CONTRACTIONS_AND_POSSESSIVES = [
    "Don't touch the dog's tail.",
    "It's a cat's toy, isn't it?",
    "The cats' bowls are empty.",
    "I'm sure they've seen it, we'll see.",
    "He'd like the girl's bike",
    "You're looking at James' car.",
    "They can't and won't stop.",
    "She shouldn't've done that",
    "It’s a dog’s life",
    "DON'T WALK sign at a crosswalk",
    "I cannot believe it",
    "Cannot park here",
    "We're gonna need a bigger boat.",
    "I wanna go, you gotta see, gimme that, lemme try.",
    "'Tis the season and 'twas the night",
    "It's 5 o'clock somewhere",
    "Y'all ain't seen nothing",
    "A rock'n'roll band on stage",
    "The O'Neil family at McDonald's",
    "Ma'am, c'mon",
    "Kids in the '90s and '90",
    "A plane from the 1990's",
]

NUMBERS_AND_SYMBOLS = [
    "1,000 people at a concert",
    "A 3.5 inch screen",
    "The clock reads 10:30.",
    "A bus with the number 42 on it",
    "Two 2 dogs and 3 cats",
    "A sign says $5 for a hot dog.",
    "50% off everything",
    "A sign for 7-Eleven and A-1 steak sauce",
    "Jersey number #23",
    "1/2 of a pizza and 1 1/2 sandwiches",
    "A ½ cup of flour",
    "It costs £5 or €3 or ¥100",
    "The date 12/25/2014 on a cake",
    "Call 555-123-4567 now",
    "A 3rd place ribbon and a 1st prize",
    "At 9am and 5pm",
    "A temperature of -5 degrees",
    "Room 101, floor 3.",
    "A 2x4 piece of wood",
    "AT&T store and a Q&A session",
    "Salt & pepper shakers",
    "Salt and/or pepper",
    "A man w/ a dog",
    "The year 2014",
    "Highway 1 1/2 miles ahead",
    "A sign reading 100 200 300",
]

HYPHENS_AND_ABBREVIATIONS = [
    "A black-and-white photo of a two-story house.",
    "An x-ray of a hand",
    "A T-shirt with a logo",
    "A well-known re-enactment",
    "Mr. Smith and Mrs. Jones talk to Dr. Who.",
    "A street in Washington, D.C. at night",
    "The U.S. flag waving",
    "U.S. soldiers standing in line",
    "A store on St. Patrick's day",
    "A boat at 5 p.m. near Mt. Hood",
    "Fruits, e.g. apples, i.e. red ones",
    "Cats vs. dogs",
    "Toys, games, etc.",
    "Acme Inc. and Widgets Co. Ltd",
    "See fig. 3 and no. 5",
    "The letter a.",
    "A sign with the letter B. The sign is red.",
    "The letter x. A sign nearby.",
    "A man named J. Smith",
    "A sign saying Ph.D. student",
    "Jan. 5 is the date",
    "A pro- and anti-war rally",
    "A co-op in the city.",
]

SPACES_AND_UNICODE = [
    "  A dog with leading spaces",
    "A dog with trailing spaces   ",
    "A   dog  with   many    spaces",
    "A\tdog\twith\ttabs",
    " \t A dog with mixed \t space ",
    "",
    "   ",
    "A café with naïve décor",
    "A crêpe and a piñata",
    "Über cool Ångström",
    "Street sign in Greek ΟΔΟΣ",
    "A sign in Chinese 你好",
    "A dog 🐶 and a cat 😺",
    "A line\nbreak in the caption",
    "A caption ending with a newline\n",
    "A no-break\u00a0space",
    "An ideographic\u3000space",
    "A zero\u200bwidth space",
    "A soft\u00adhyphen",
    "x² and H₂O",
    "A price of 5¢",
    "Visit www.example.com today",
    "Go to http://example.org/page now",
    "Email me at someone@example.com",
    "A tag <b>bold</b> here",
    "A sign with < and > signs",
    "A file named photo.jpg on screen",
    "C++ and C# books",
    "The -LRB- token",
]

CAPTIONS = (
    COCO_LIKE
    + PUNCTUATION_AND_QUOTES
    + CONTRACTIONS_AND_POSSESSIVES
    + NUMBERS_AND_SYMBOLS
    + HYPHENS_AND_ABBREVIATIONS
    + SPACES_AND_UNICODE
)

# Outputs of the Java tokenizer, written down: these need no Java.
HAND_CHECKED = [
    ("A man (in red) riding a bike.", "a man -lrb- in red -rrb- riding a bike"),
    ("Don't you see it's Mr. Smith's cats' toys?", "do n't you see it 's mr. smith 's cats toys"),
    ("I cannot believe it, gonna wanna gotta.", "i can not believe it gon na wan na got ta"),
    ("He paid $5 & 50% of 1,000 and 3.5 / 2 dogs.", "he paid $ 5 & 50 % of 1,000 and 3.5 / 2 dogs"),
    ("a black-and-white photo of U.S. flags...", "a black-and-white photo of u.s. flags"),
    ('A sign that says "STOP".', "a sign that says stop"),
    ("Two [dogs] {play}; wow!! what?!", "two -lsb- dogs -rsb- -lcb- play -rcb- wow !! what ?!"),
    ("  Café —\tnaïve…  ", "café naïve"),
    ("½ cup and 1 1/2 cups", "1/2 cup and 1\u00a01/2 cups"),
    ("A dog\nsits.", "a dog sits"),
    ("", ""),
    ("The letter a.", "the letter a."),
]

# Read up to the end of the input (the last caption of a call, or a caption alone), ":)" is not one token but
# ":" (dropped) and ")" ("-rrb-").
LAST = "A smiling face :)"


def _mismatches(captions: list[str], expected: list[str], got: list[str]) -> list[tuple[str, str, str]]:
    return [(c, e, g) for c, e, g in zip(captions, expected, got, strict=True) if e != g]


@pytest.mark.skipif(
    shutil.which("java") is None,
    reason="pycocoevalcap's PTBTokenizer runs Stanford CoreNLP through Java, and java is not on PATH",
)
def test_matches_pycocoevalcap_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = CAPTIONS + [caption for caption, _ in HAND_CHECKED] + [LAST]
    assert len(CAPTIONS) >= 150
    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    expected = [java[i][0] for i in range(len(captions))]

    assert _mismatches(captions, expected, ptb_tokenize_all(captions)) == []
    assert ptb_tokenize(LAST) == expected[-1]


@pytest.mark.parametrize(("caption", "expected"), HAND_CHECKED)
def test_hand_checked(caption: str, expected: str):
    assert ptb_tokenize(caption) == expected
    assert ptb_tokenize_all(["A dog.", caption, "two cats."])[1] == expected


def test_next_caption_and_end_of_input():
    # A one-letter acronym before a listed capitalised word, here the next caption's, loses its period.
    assert ptb_tokenize_all(["The letter a.", "The end."]) == ["the letter a", "the end"]
    assert ptb_tokenize_all(["The letter a.", "", "  ", "The end."]) == ["the letter a", "", "", "the end"]
    assert ptb_tokenize_all(["The letter a.", "the end."]) == ["the letter a.", "the end"]
    assert ptb_tokenize_all([LAST, LAST]) == ["a smiling face :-rrb-", "a smiling face -rrb-"]
    assert ptb_tokenize(LAST) == "a smiling face -rrb-"


def test_line_breaks_inside_a_caption_are_spaces():
    # Java would start a new line at "\r" and shift every later caption of the call (see the module docstring).
    assert ptb_tokenize_all(["a dog\rsits", "a cat\u2028sleeps", "next"]) == [
        "a dog sits",
        "a cat sleeps",
        "next",
    ]
    assert ptb_tokenize_all(["a dog\r", "next\r\n"]) == ["a dog", "next"]


def test_cached_chunks_match_the_plain_scanner():
    captions = CAPTIONS + [caption for caption, _ in HAND_CHECKED] + [LAST]
    lines = [caption.replace("\n", " ") for caption in captions]
    tails = ["\n" + following + "\n" for following in lines[1:]] + [""]
    plain = [" ".join(ptb._scan_line(line, tail)) for line, tail in zip(lines, tails, strict=True)]
    ptb._before_space.clear()
    ptb._in_context.clear()
    cold = ptb_tokenize_all(captions)
    warm = ptb_tokenize_all(captions)
    assert _mismatches(captions, plain, cold) == []
    assert warm == cold
