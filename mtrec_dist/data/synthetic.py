"""For demos, tests and benchmarks: a synthetic MIND with a planted click model of known ceiling.

Why: MIND itself cannot ship with the repository, and a real dataset never tells you how good a
model *could* be. ``generate`` writes ``train/ dev/ test/`` (``news.tsv`` + ``behaviors.tsv``,
test without labels, exactly like MIND's test split) plus ``truth/`` (the true click probability
of every candidate and the sampled test labels) and ``synth.json`` (counts and the *ceiling*
metrics: AUC / MRR / nDCG@5 / nDCG@10 obtained by ranking with the true probabilities, computed
by the evaluator's metric code with its tie rule, so it is the figure ``mtrec evaluate`` would
report for a model that outputs those probabilities). A model
trained on the synthetic train split can therefore be judged against the best achievable score.

Planted click model (everything a model needs is visible in the titles)
-----------------------------------------------------------------------
* World: 18 MIND categories (news, sports, finance, ...), each with 3-8 subcategories and an
  inline pool of ~25-30 English words. Named entities (people "P", organisations "O", places
  "G"; Wikidata-like ids ``Q123456``) are composed from name lists, unique by surface form, and
  tied to 1-2 categories. Within a category, words and entities have Zipf-like frequencies.
* News: category drawn from a MIND-like prior (news and sports dominate); title from a template
  mixing category words ``{W}``, global verbs/adjectives, function words and 0-3 entities
  ``{E}`` of its category whose names appear verbatim (so exact-match NER finds them; the
  ``TitleEntities`` JSON carries the character offset of each surface form). Abstract: one
  sentence from the same pools, ``AbstractEntities`` = ``[]``. Popularity ``pop ~ Pareto(1.3)``
  (top 1% of news take a large share of impressions), published on one day.
* Users: 2-4 interest categories with Dirichlet weights ``w_u[c]`` (0 elsewhere), 2-4 favourite
  entities from those categories, 2 favourite words per interest category.
* Click probability (a logistic model):

      affinity(u, n) = w_u[cat(n)] + BETA_ENT * |ents(n) & fav_ents(u)|
                                   + BETA_WORD * |words(n) & fav_words(u, cat(n))|
      p(u, n) = sigmoid(BIAS + AFF * affinity(u, n)
                        + POP * min(log pop(n) - E[log pop], POP_CAP))

  quantised to 1e-7 (the value written to ``truth/*_probs.tsv`` is the value the labels were
  sampled from, so the ceiling recomputed from the files is exact). Constants give a click rate
  of ~4.5% (MIND: ~4%; one forced click among 10-40 candidates alone is ~4%) and a ceiling
  per-impression AUC of ~0.80 (dev) on ``small``. Category, entities and words are all in the
  title and category columns; popularity is learnable from click counts only.
* Time: publication days -6..6; the window is 11/09/2019 (day 1) to 11/14/2019 (day 6):
  train = days 1-4, dev = day 5, test = day 6. A news is live for 3 days (its day and the next
  two). Each candidate slot is "fresh" (published that very day) with probability 0.17, else
  drawn from the older live news; within either pool, proportional to popularity. Hence ~17% of
  dev candidates are unseen in train (cold start), and ~17% of test candidates are unseen in
  train + dev (day-5 news are seen only in dev, so ~55% of test candidates are unseen in train
  alone; synth.json reports both).
* History (MIND convention): a user's click history is fixed, built from clicks before the
  window (news of days -6..0): draw ``3h + 4`` popularity-biased candidates and keep ``h`` of
  them by weighted sampling without replacement with weights ``p(u, n)``; ordered by
  publication day, most recent last (random within a day). ~5% of users have an empty
  history. ``h`` is log-normal, median 18, at most 150 (a user may get fewer distinct news).
* Impressions: users by log-normal activity, uniform time within the day (file sorted by time),
  10-40 distinct candidates in random order. Labels are Bernoulli(p) *conditioned on at least
  one click* (MIND only keeps impressions with a click), sampled exactly: first click index from
  ``P(first = k) = p_k prod_{j<k}(1 - p_j) / P(any)``, later ones independently. Test labels are
  sampled the same way and written only to ``truth/test_truth.txt``.

Determinism: every random draw comes from ``numpy.random.Generator(PCG64)`` children of
``SeedSequence(seed)`` (one per stage and per day), in a fixed order; no ``hash()`` of
strings and no set iteration. Same seed -> byte-identical files.

Speed: everything per candidate is vectorised over blocks of impressions (``_BLOCK``); only
the line formatting is per impression. ``large`` (MIND-large counts) streams every file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtrec_dist.config import ConfigError
from mtrec_dist.data import mind
from mtrec_dist.data.tables import Entity, Impression, News
from mtrec_dist.metrics import METRICS, ranked_impression_metrics
from mtrec_dist.utils import Progress, atomic_open, atomic_write_json, sha256_file

# --------------------------------------------------------------------------------------------
# Scales and constants


@dataclass(frozen=True)
class Scale:
    train: int  # impressions
    dev: int
    test: int
    news: int  # news in the world (each split's news.tsv holds those its behaviors reference)
    users: int
    entities: int


SCALES: dict[str, Scale] = {
    "tiny": Scale(train=400, dev=100, test=100, news=300, users=100, entities=90),
    "small": Scale(train=20_000, dev=5_000, test=5_000, news=8_000, users=5_000, entities=1_500),
    # MIND-large impression counts; ~161k news, 750k users (MIND-large: ~1M users).
    "large": Scale(
        train=2_232_748,
        dev=376_471,
        test=2_370_727,
        news=161_000,
        users=750_000,
        entities=24_000,
    ),
}

START = dt.datetime(2019, 11, 9)  # day 1
PRE_DAYS = 7  # publication days -6..0 (history pool)
TRAIN_DAYS = (1, 2, 3, 4)
DEV_DAY = 5
TEST_DAY = 6
SPLIT_DAYS = {"train": TRAIN_DAYS, "dev": (DEV_DAY,), "test": (TEST_DAY,)}
PRE_DAY_WEIGHT, WINDOW_DAY_WEIGHT = 0.7, 1.5  # share of news published per day
LIVE_DAYS = 3  # a news is a candidate on its publication day and the next two
FRESH_SHARE = 0.17  # P(candidate slot drawn from news published that very day)
MIN_CAND, MAX_CAND = 10, 40
EMPTY_HISTORY_SHARE = 0.05
HIST_MEDIAN, HIST_SIGMA, HIST_MAX = 18.0, 0.8, 150
POP_ALPHA = 1.3  # Pareto tail of news popularity
ACTIVITY_SIGMA = 1.0  # log-normal user activity

# Click model (see module docstring).
BIAS = -6.6
AFF = 3.0
BETA_ENT = 0.8
BETA_WORD = 0.6
POP = 0.6
# Candidates are drawn proportional to popularity, so their log-popularity spread grows with the
# pool size (a size-biased Pareto); capping the term keeps the ceiling similar at every scale.
POP_CAP = 2.5
PROB_SCALE = 10_000_000  # probabilities quantised to 1e-7

_BLOCK = 100_000  # impressions generated at once
_PROB_CHUNK = 1_000_000  # (user, news) pairs scored at once

# --------------------------------------------------------------------------------------------
# Vocabulary: categories (name, prior weight, subcategories, word pool)

_CATEGORIES: tuple[tuple[str, float, str, str], ...] = (
    (
        "news",
        30.0,
        "newsus newsworld newspolitics newscrime newsscienceandtechnology newsopinion",
        "election vote senate court ruling policy congress governor mayor protest law tax "
        "police investigation campaign reform hearing bill official agency border crisis "
        "statement debate probe lawsuit verdict",
    ),
    (
        "sports",
        28.0,
        "football_nfl basketball_nba baseball_mlb soccer golf icehockey_nhl football_ncaa",
        "game season coach quarterback playoff touchdown league championship team roster draft "
        "trade injury match goal striker pitcher inning stadium tournament rookie defense "
        "offense fans rivalry victory halftime",
    ),
    (
        "finance",
        6.0,
        "finance-companies markets personalfinance realestate retirement",
        "stocks market earnings investors shares bank rates inflation dividend profit revenue "
        "economy bonds portfolio savings mortgage fund crypto merger forecast quarter loan "
        "credit debt wages pension analysts",
    ),
    (
        "lifestyle",
        6.0,
        "lifestylebuzz lifestyleroyals shop-holidays lifestyleparenting pets lifestylestyle",
        "home style fashion wedding garden decor family parenting relationship beauty hair "
        "skincare shopping holiday gift pets dog cat closet trend outfit makeover thrift hobby "
        "friendship etiquette routine wardrobe",
    ),
    (
        "health",
        4.0,
        "wellness medical nutrition fitness weightloss",
        "diet sleep heart cancer vaccine doctor hospital symptoms exercise weight brain study "
        "patients therapy flu diabetes workout stress anxiety blood protein vitamins clinic "
        "treatment disease yoga calories",
    ),
    (
        "foodanddrink",
        4.0,
        "recipes foodnews restaurants cookingschool",
        "recipe dinner chicken pasta cookies pie restaurant chef wine beer coffee breakfast soup "
        "salad dessert burger pizza bakery kitchen grill menu cocktail turkey steak casserole "
        "baking sauce cheese tacos",
    ),
    (
        "travel",
        3.0,
        "travelnews traveltripideas travelarticle",
        "flight airport hotel beach island cruise vacation resort passport airline destination "
        "trip luggage journey tourists cabin hiking camping park mountain lake village museum "
        "landmark itinerary adventure getaway",
    ),
    (
        "weather",
        2.0,
        "weathertopstories weathernews weatherfullscreenmaps",
        "storm snow rain hurricane tornado flood heat wind temperatures frost blizzard drought "
        "thunderstorms hail wildfire fog chill sunshine outlook radar advisory clouds humidity "
        "freeze winter",
    ),
    (
        "autos",
        3.0,
        "autosnews autosenthusiasts autosclassics autosreview",
        "car truck engine suv sedan electric recall dealer horsepower pickup battery mileage "
        "hybrid tires brakes sportscar convertible garage driver crash charging dashboard lease "
        "warranty coupe motorcycle highway racing",
    ),
    (
        "video",
        3.0,
        "news viral animals lifestyle",
        "clip footage viral camera rescue prank reaction stunt dashcam interview montage "
        "highlight scene drone bodycam livestream compilation replay tutorial unboxing vlog "
        "broadcast spotlight skit",
    ),
    (
        "music",
        2.0,
        "musicnews musiccelebrity music-awards",
        "album song singer band concert tour rapper grammy single guitar lyrics festival "
        "playlist chart duet vinyl orchestra anthem ballad drummer choir remix soundtrack "
        "producer melody",
    ),
    (
        "movies",
        2.0,
        "movienews movies-celebrity movies-awards movies-gallery",
        "film director actor actress oscar sequel premiere boxoffice script studio blockbuster "
        "franchise cast role villain hero thriller comedy horror remake screening critics "
        "animation biopic cameo reboot",
    ),
    (
        "tv",
        3.0,
        "tvnews tv-celebrity tv-recaps tv-gallery",
        "series episode finale network sitcom talkshow reality contestant ratings streaming "
        "drama spinoff pilot showrunner cliffhanger character binge reunion primetime anchor "
        "newsroom panel audition judges",
    ),
    (
        "entertainment",
        3.0,
        "celebrity entertainment-celebrity awards royals",
        "celebrity star royal gossip awards redcarpet couple divorce baby paparazzi influencer "
        "photos gala fame rumors engagement tribute memoir feud comeback birthday selfie "
        "headline glamour",
    ),
    (
        "kids",
        0.5,
        "kidsnews kids-learning kids-fun",
        "toys school homework cartoon playground crafts puzzle storybook teacher classroom "
        "lunchbox recess science coloring dinosaur robot puppet fairytale riddle picnic "
        "sleepover bedtime costume",
    ),
    (
        "middleeast",
        0.5,
        "middleeast-top-stories middleeast-lifestyle middleeast-business",
        "gulf oil desert ceasefire embassy pipeline sheikh summit refugees sanctions kingdom "
        "peninsula treaty emirate mosque bazaar caravan oasis talks minister envoy strait "
        "tanker",
    ),
    (
        "northamerica",
        0.5,
        "northamerica-canada northamerica-mexico northamerica-usa",
        "province prairie tribe reservation bison frontier cartel tariff maple hockey rodeo "
        "ranch trucking pipeline wilderness glacier fisheries treaty railway lumber harvest "
        "township",
    ),
    (
        "games",
        0.5,
        "gaming esports gamingnews",
        "console gamer esports controller quest level boss multiplayer arcade sandbox shooter "
        "speedrun patch expansion tournament streamer joystick leaderboard pixel retro sequel "
        "trophy",
    ),
)

_VERBS = (
    "wins faces reveals slams unveils plans joins backs blocks delays expands cuts boosts tops "
    "misses warns signs drops launches rejects targets shares questions praises tests hosts "
    "leads leaves breaks sets"
).split()
_ADJS = (
    "new big surprising record major early late top rare simple classic bold quiet huge final "
    "fresh local global strange smart best worst fast cheap hidden first latest key rising "
    "historic"
).split()
_FIRST = (
    "James Mary John Patricia Robert Jennifer Michael Linda William Elizabeth David Barbara "
    "Richard Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Nancy Daniel Lisa "
    "Matthew Betty Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily Andrew "
    "Donna Joshua Michelle Kenneth Carol Kevin Amanda Brian Dorothy George Melissa Timothy "
    "Deborah Ronald Stephanie Edward Rebecca Jason Sharon Jeffrey Laura Ryan Cynthia Jacob "
    "Kathleen Gary Amy Nicholas Angela Eric Shirley Jonathan Anna Stephen Brenda Larry Pamela "
    "Justin Emma Scott Nicole Brandon Helen Benjamin Samantha Samuel Katherine Gregory Christine "
    "Alexander Debra Frank Rachel Patrick Carolyn Raymond Janet Jack Catherine Dennis Maria Jerry "
    "Heather Tyler Diane Aaron Ruth Jose Julie Adam Olivia Henry Joyce Nathan Virginia"
).split()
_LAST = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
    "Gonzalez Wilson Anderson Taylor Moore Jackson Martin Perez Thompson White Harris "
    "Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Torres Nguyen Hill "
    "Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips "
    "Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook "
    "Rogers Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward "
    "Richardson Watson Brooks Chavez Wood Bennett Gray Mendoza Ruiz Hughes Price Alvarez "
    "Castillo Sanders Patel Myers Long Ross Foster Jimenez"
).split()
_ORG_A = (
    "Apex Summit Northstar Bluewater Ironwood Silverline Redrock Greenfield Brightpath "
    "Stonebridge Clearview Highland Oakmont Riverside Goldcrest Lakeshore Westgate Eastwood "
    "Pinecrest Harbor Crescent Falcon Horizon Liberty Pioneer Sterling Vanguard Evergreen "
    "Keystone Meridian Beacon Cobalt Granite Orion Phoenix Quantum Ridgeline Sapphire Titan "
    "Vertex Zenith Atlas Bison Cedarline Delta Ember Frontier Monarch Nimbus Polaris"
).split()
_ORG_B = (
    "Motors Bank Group Labs Media Airlines Foods Energy Records Studios United Athletics Health "
    "Partners Holdings Capital Systems Networks Pictures Brewing Resorts Insurance Pharma "
    "Robotics Games Council Institute Foundation University Hospital Rangers Tigers Eagles "
    "Wolves Hawks Lions Sharks Bears"
).split()
_PLACE_ROOT = (
    "Ash Brook Cedar Clay Dover Elm Fair Glen Hart Hazel Kings Lin Mill Oak Pine Red Rock Rose "
    "Salt Sand Silver Spring Stone Sun Thorn Water West Wil Win Yar Ard Bel Bran Carr Dun Fern "
    "Hol Lang Mar Nor Pen Ros Stan Tam Val Wex Alder Birch Cold"
).split()
_PLACE_END = (
    "ford ton ville field burg port dale wood haven mouth bury ridge stead wick land".split()
)
_PLACE_PRE = ("", "New ", "Port ", "Lake ", "Fort ", "East ", "North ", "South ", "West ")

# Title templates by number of entities: {E} entity, {W} category word, {V} verb, {A} adjective,
# {N} a small number.
_TITLES: tuple[tuple[str, ...], ...] = (
    (
        "{A} {W} {V} {W} as {W} season begins",
        "How {W} {V} the {W} market",
        "{N} {A} {W} ideas for your {W}",
        "Why {W} and {W} matter this week",
        "The {A} {W} that {V} every {W}",
        "What the {A} {W} means for {W} fans",
    ),
    (
        "{E} {V} {A} {W} after {W}",
        "{W} update: what {E} said about the {W}",
        "Inside {E}'s {A} {W}",
        "{N} things {E} {V} about {W}",
        "{E} {V} {W} in {A} {W} deal",
        "The {W} of {E}: a {A} {W} story",
    ),
    (
        "{E} and {E} {V} {W} over {W}",
        "{E} {V} {E} in {A} {W}",
        "{W} at {E}: {E} {V} {W}",
        "Why {E} {V} the {A} {W} with {E}",
    ),
    (
        "{E}, {E} and {E} {V} {A} {W}",
        "{E} {V} {W} with {E} as {E} {V} {W}",
        "{A} {W}: {E} {V} {E} and {E}",
    ),
)
_ABSTRACTS = (
    "The {A} {W} and the {W} {V} new questions, according to reports.",
    "Experts say the {W} {V} a {A} {W} for the {W} this season.",
    "Here is what to know about the {A} {W} and how it {V} the {W}.",
    "A {A} look at the {W}, the {W} and what comes next.",
)
_N_ENT_PROBS = np.array([0.3, 0.4, 0.2, 0.1])
_ENT_TYPES = ("P", "O", "G")
_ENT_TYPE_PROBS = np.array([0.5, 0.3, 0.2])
_WORD_ZIPF, _ENT_ZIPF = 0.7, 0.9


def _child(ss: np.random.SeedSequence, *key: int) -> np.random.Generator:
    """A generator for one stage, independent of how much the other stages draw."""
    child = np.random.SeedSequence(entropy=ss.entropy, spawn_key=tuple(key))
    return np.random.Generator(np.random.PCG64(child))


def _zipf_cum(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    c = np.cumsum(w)
    return c / c[-1]


# --------------------------------------------------------------------------------------------
# World: entities, news, users


@dataclass
class _World:
    n_cat: int
    cat_names: list[str]
    sub_names: list[list[str]]
    words: list[list[str]]
    # entities
    ent_name: list[str]
    ent_type: list[str]
    ent_qid: list[str]
    ent_conf: np.ndarray
    cat_ents: list[np.ndarray]  # entity ids tied to each category, in Zipf rank order
    # news (sorted by publication day)
    news_id: np.ndarray  # object array of "N..." strings
    day: np.ndarray  # int8, -6..6
    day_lo: dict[int, int]  # first news index of each day
    cat: np.ndarray  # int64 [N]
    ent: np.ndarray  # int32 [N, 3], -1 pad
    wmask: np.ndarray  # uint64 [N], bit i = word i of the category pool is in the title
    logpop: np.ndarray  # float64 [N]
    cumpop: np.ndarray  # float64 [N+1], cumulative popularity (candidate draws)
    records: list[News]
    # users
    user_id: list[str]
    w_flat: np.ndarray  # float64 [U*C] interest weights
    fw_flat: np.ndarray  # uint64 [U*C] favourite-word masks
    fav_ent: np.ndarray  # int32 [U, 4], -2 pad
    cum_act: np.ndarray  # float64 [U], cumulative activity
    hist_ptr: np.ndarray  # int64 [U+1]
    hist: np.ndarray  # int32 [sum h]


def _unique_names(rng: np.random.Generator, k: int, spaces: list[tuple[int, callable]]) -> list:
    """k distinct names: exhaust the shorter name spaces first, sampling within each."""
    out: list[str] = []
    for size, make in spaces:
        need = k - len(out)
        if need <= 0:
            break
        codes = rng.choice(size, size=min(need, size), replace=False)
        out.extend(make(int(c)) for c in codes)
    if len(out) < k:
        raise ConfigError(f"entities: at most {len(out)} distinct names available, asked {k}")
    return out


def _person(c: int) -> str:
    return f"{_FIRST[c % len(_FIRST)]} {_LAST[c // len(_FIRST)]}"


def _person_initial(c: int) -> str:
    f, rest = c % len(_FIRST), c // len(_FIRST)
    i, last = rest % 26, rest // 26
    return f"{_FIRST[f]} {chr(65 + i)}. {_LAST[last]}"


def _org(c: int) -> str:
    return f"{_ORG_A[c % len(_ORG_A)]} {_ORG_B[c // len(_ORG_A)]}"


def _org_long(c: int) -> str:
    a, rest = c % len(_ORG_A), c // len(_ORG_A)
    b, s = rest % len(_ORG_A), rest // len(_ORG_A)
    return f"{_ORG_A[a]} {_ORG_A[b]} {_ORG_B[s]}"


def _place(c: int) -> str:
    r, rest = c % len(_PLACE_ROOT), c // len(_PLACE_ROOT)
    e, p = rest % len(_PLACE_END), rest // len(_PLACE_END)
    return f"{_PLACE_PRE[p]}{_PLACE_ROOT[r]}{_PLACE_END[e]}"


_NAME_SPACES = {
    "P": [
        (len(_FIRST) * len(_LAST), _person),
        (len(_FIRST) * 26 * len(_LAST), _person_initial),
    ],
    "O": [
        (len(_ORG_A) * len(_ORG_B), _org),
        (len(_ORG_A) ** 2 * len(_ORG_B), _org_long),
    ],
    "G": [(len(_PLACE_ROOT) * len(_PLACE_END) * len(_PLACE_PRE), _place)],
}


_SLOT_RE = re.compile(r"(\{[A-Z]\})")


@functools.cache
def _tokens(template: str) -> tuple[str, ...]:
    """``"{E} wins {W}"`` -> ``("{E}", " wins ", "{W}")`` (parsed once per template)."""
    return tuple(t for t in _SLOT_RE.split(template) if t)


def _fill(template: str, fills: dict[str, list[str]]) -> tuple[str, list[tuple[int, int]]]:
    """Fill ``{X}`` slots left to right; return the text and (entity slot, char offset) pairs."""
    out: list[str] = []
    pos = 0
    used = dict.fromkeys(fills, 0)
    ent_offsets: list[tuple[int, int]] = []
    for tok in _tokens(template):
        if len(tok) == 3 and tok[0] == "{" and tok[2] == "}":
            key = tok[1]
            val = fills[key][used[key]]
            if key == "E":
                ent_offsets.append((used[key], pos))
            used[key] += 1
        else:
            val = tok
        out.append(val)
        pos += len(val)
    return "".join(out), ent_offsets


def _take_distinct(draws: np.ndarray, k: int) -> list[int]:
    out: list[int] = []
    if k <= 0:
        return out
    for d in draws.tolist():
        if d not in out:
            out.append(d)
            if len(out) == k:
                break
    return out


@dataclass
class _Categories:
    """The static category table (``_CATEGORIES``) in the shapes the world builders read."""

    names: list[str]
    prior: np.ndarray  # float64 [C], normalised MIND-like category frequencies
    sub_names: list[list[str]]
    words: list[list[str]]  # word pool of each category
    word_cum: list[np.ndarray]  # Zipf CDF over each word pool


def _categories() -> _Categories:
    """Read and check the category table; draws nothing.

    Why the check: a title's words are stored as a uint64 bitmask over its category's pool
    (``_World.wmask``), so a pool past 64 words or with a repeated word would silently corrupt
    the planted word-overlap term.
    """
    names = [c[0] for c in _CATEGORIES]
    prior = np.array([c[1] for c in _CATEGORIES])
    prior /= prior.sum()
    sub_names = [c[2].split() for c in _CATEGORIES]
    words = [c[3].split() for c in _CATEGORIES]
    for name, ws in zip(names, words):
        if not (20 <= len(ws) <= 64) or len(set(ws)) != len(ws):
            raise AssertionError(f"word pool of {name}: expected 20-64 distinct words")
    word_cum = [_zipf_cum(len(ws), _WORD_ZIPF) for ws in words]
    return _Categories(names, prior, sub_names, words, word_cum)


@dataclass
class _Entities:
    """Every named entity of the world, and which of them each category can mention."""

    ent_name: list[str]
    ent_type: list[str]
    ent_qid: list[str]
    ent_conf: np.ndarray
    cat_ents: list[np.ndarray]  # entity ids tied to each category, in Zipf rank order
    ent_cum: list[np.ndarray]  # Zipf CDF over each category's entities


def _build_entities(rng: np.random.Generator, E: int, cats: _Categories) -> _Entities:
    """Draw E entities (type, unique name, Wikidata-like id, confidence, 1-2 categories).

    Why its own step: these are the first draws of the world stream, and the news and users
    built after them only look entities up by category (``cat_ents``, ``ent_cum``).
    """
    C = len(cats.names)
    etype_idx = rng.choice(3, size=E, p=_ENT_TYPE_PROBS)
    ent_name: list[str] = [""] * E
    for t, code in enumerate(_ENT_TYPES):
        idx = np.flatnonzero(etype_idx == t)
        names = _unique_names(rng, len(idx), _NAME_SPACES[code])
        for i, nm in zip(idx.tolist(), names):
            ent_name[i] = nm
    ent_type = [_ENT_TYPES[t] for t in etype_idx.tolist()]
    qids = rng.choice(9_000_000, size=E, replace=False) + 1000
    ent_qid = [f"Q{q}" for q in qids.tolist()]
    ent_conf = np.round(rng.uniform(0.8, 1.0, size=E), 3)
    cat1 = rng.choice(C, size=E, p=cats.prior)
    cat2 = rng.choice(C, size=E, p=cats.prior)
    two = (rng.random(E) < 0.4) & (cat2 != cat1)
    cat_ents = []
    for c in range(C):
        cat_ents.append(np.flatnonzero((cat1 == c) | (two & (cat2 == c))).astype(np.int32))
    ent_cum = [_zipf_cum(max(len(e), 1), _ENT_ZIPF) for e in cat_ents]
    return _Entities(ent_name, ent_type, ent_qid, ent_conf, cat_ents, ent_cum)


def _news_days(N: int) -> tuple[np.ndarray, dict[int, int]]:
    """Publication day of each news index, and the first index of each day; draws nothing.

    Why sorted by day: candidate draws (``_draw_news``) sample a day's news as one contiguous
    index range ``[day_lo[d], day_lo[d + 1])``, proportional to cumulative popularity.
    """
    days = np.arange(-(PRE_DAYS - 1), TEST_DAY + 1)
    w = np.where(days <= 0, PRE_DAY_WEIGHT, WINDOW_DAY_WEIGHT)
    per_day = np.floor(N * w / w.sum()).astype(np.int64)
    per_day[-1] += N - per_day.sum()  # remainder on the last day
    day = np.repeat(days, per_day).astype(np.int8)
    starts = np.concatenate([[0], np.cumsum(per_day)])
    day_lo = {int(d): int(s) for d, s in zip(days, starts[:-1])}
    day_lo[TEST_DAY + 1] = N
    return day, day_lo


@dataclass
class _News:
    """The news half of ``_World`` (same field names), sorted by publication day."""

    news_id: np.ndarray
    day: np.ndarray
    day_lo: dict[int, int]
    cat: np.ndarray
    ent: np.ndarray
    wmask: np.ndarray
    logpop: np.ndarray
    cumpop: np.ndarray
    records: list[News]


@dataclass
class _NewsDraws:
    """Per-news random numbers, drawn for all news at once before any text is composed."""

    n_ent: np.ndarray  # [N] entities asked for (0-3)
    sub_u: np.ndarray  # [N] uniform: subcategory
    tmpl_u: np.ndarray  # [N] uniform: title template
    abs_u: np.ndarray  # [N] uniform: abstract template
    word_draw: np.ndarray  # [N, 12] uniforms: Zipf word draws
    ent_draw: np.ndarray  # [N, 8] uniforms: Zipf entity draws
    misc: np.ndarray  # [N, 8] integers: verbs, adjectives, numbers


def _build_news(
    rng: np.random.Generator, N: int, cats: _Categories, ents: _Entities, progress: bool
) -> _News:
    """Draw N news (id, category, popularity, then every per-news number) and compose them.

    Why all the draws come first, as whole arrays: the number of draws must not depend on the
    text composed (so the users drawn next see the same stream), and it keeps the loop in
    ``_compose_news`` free of generator calls.
    """
    day, day_lo = _news_days(N)
    nums = rng.choice(N * 5, size=N, replace=False) + 10_000
    news_id = np.array([f"N{x}" for x in nums.tolist()], dtype=object)
    cat = rng.choice(len(cats.names), size=N, p=cats.prior).astype(np.int64)
    pop = (1.0 - rng.random(N)) ** (-1.0 / POP_ALPHA)
    logpop = np.log(pop) - 1.0 / POP_ALPHA  # E[log pop] = 1/alpha for Pareto(alpha)
    cumpop = np.concatenate([[0.0], np.cumsum(pop)])
    # one statement per draw, in stream order
    n_ent = rng.choice(4, size=N, p=_N_ENT_PROBS)
    sub_u = rng.random(N)
    tmpl_u = rng.random(N)
    abs_u = rng.random(N)
    word_draw = rng.random((N, 12))
    ent_draw = rng.random((N, 8))
    misc = rng.integers(0, 1 << 30, size=(N, 8))
    draws = _NewsDraws(n_ent, sub_u, tmpl_u, abs_u, word_draw, ent_draw, misc)
    ent, wmask, records = _compose_news(news_id, cat, draws, cats, ents, progress)
    return _News(news_id, day, day_lo, cat, ent, wmask, logpop, cumpop, records)


def _compose_news(
    news_id: np.ndarray,
    cat: np.ndarray,
    d: _NewsDraws,
    cats: _Categories,
    ents: _Entities,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, list[News]]:
    """Turn each news' draws into its entities, title word mask and ``News`` record.

    Why a separate loop: this is the only per-news Python work of the world (the rest is
    vectorised), so it is the one place that reports progress.
    """
    N = len(news_id)
    ent = np.full((N, 3), -1, dtype=np.int32)
    wmask = np.zeros(N, dtype=np.uint64)
    records: list[News] = []
    prog = Progress("synth: news", N, unit="news")
    prog.enabled = prog.enabled and progress
    for n in range(N):
        c = int(cat[n])
        pool_e = ents.cat_ents[c]
        m = min(int(d.n_ent[n]), len(pool_e))
        picks = _take_distinct(np.searchsorted(ents.ent_cum[c], d.ent_draw[n], side="right"), m)
        ids = [int(pool_e[i]) for i in picks]
        widx = _take_distinct(np.searchsorted(cats.word_cum[c], d.word_draw[n], side="right"), 8)
        names = [ents.ent_name[e] for e in ids]
        ws = cats.words[c]
        title, offs, abstract, title_w = _news_text(
            names, ws, widx, d.tmpl_u[n], d.abs_u[n], d.misc[n].tolist()
        )
        mask = 0
        for i in title_w:
            mask |= 1 << i
        wmask[n] = mask
        ent[n, : len(ids)] = ids
        subs = cats.sub_names[c]
        nid = news_id[n]
        records.append(
            News(
                news_id=nid,
                category=cats.names[c],
                subcategory=subs[int(d.sub_u[n] * len(subs))],
                title=title,
                abstract=abstract,
                url=f"https://synthetic.mtrec.invalid/news/{nid}.html",
                title_entities=_title_entities(ents, ids, offs),
                abstract_entities=[],
            )
        )
        prog.update()
    prog.close()
    return ent, wmask, records


def _news_text(
    names: list[str],
    ws: list[str],
    widx: list[int],
    tmpl_u: float,
    abs_u: float,
    r: list[int],
) -> tuple[str, list[tuple[int, int]], str, list[int]]:
    """Title, its entity offsets, abstract, and the word indices the title uses.

    Why the title words are returned: they (not the abstract's) form the news' word mask, the
    part of the planted click model a model can read from the title.
    """
    ts = _TITLES[len(names)]
    template = ts[int(tmpl_u * len(ts))]
    ab = _ABSTRACTS[int(abs_u * len(_ABSTRACTS))]
    n_w = template.count("{W}")
    fills = {
        "E": names,
        "W": [ws[i] for i in widx[:n_w]],
        "V": [_VERBS[r[0] % len(_VERBS)], _VERBS[r[1] % len(_VERBS)]],
        "A": [_ADJS[r[2] % len(_ADJS)]],
        "N": [str(3 + r[3] % 13)],
    }
    title, offs = _fill(template, fills)
    title = title[0].upper() + title[1:]
    abs_fills = {
        "W": [ws[i] for i in widx[n_w:]] + [ws[i] for i in widx[:n_w]],
        "V": [_VERBS[r[4] % len(_VERBS)]],
        "A": [_ADJS[r[5] % len(_ADJS)]],
    }
    abstract, _ = _fill(ab, abs_fills)
    return title, offs, abstract, widx[:n_w]


def _title_entities(ents: _Entities, ids: list[int], offs: list[tuple[int, int]]) -> list[Entity]:
    """MIND ``TitleEntities``: one entry per entity slot, at the offset its name was placed.

    Why from the fill offsets: exact-match NER must find each name verbatim at that offset.
    """
    return [
        Entity(
            label=ents.ent_name[ids[j]],
            type=ents.ent_type[ids[j]],
            wikidata_id=ents.ent_qid[ids[j]],
            confidence=float(ents.ent_conf[ids[j]]),
            offsets=[off],
            surface_forms=[ents.ent_name[ids[j]]],
        )
        for j, off in offs
    ]


@dataclass
class _Users:
    """The user half of ``_World`` (same field names), histories excepted."""

    user_id: list[str]
    w_flat: np.ndarray
    fw_flat: np.ndarray
    fav_ent: np.ndarray
    cum_act: np.ndarray


def _build_users(rng: np.random.Generator, U: int, cats: _Categories, ents: _Entities) -> _Users:
    """Draw U users: interests and favourites, then ids and activity.

    Why ids and activity come last: they are the world stream's final draws, after the
    interests (``_user_interests``), and the order is part of what the seed reproduces.
    """
    w_mat, fw_mat, fav_ent = _user_interests(rng, U, cats, ents)
    unums = rng.choice(U * 3, size=U, replace=False) + 1
    user_id = [f"U{x}" for x in unums.tolist()]
    act = np.exp(rng.normal(0.0, ACTIVITY_SIGMA, size=U))
    cum_act = np.cumsum(act)
    return _Users(user_id, w_mat.reshape(-1), fw_mat.reshape(-1), fav_ent, cum_act)


def _user_interests(
    rng: np.random.Generator, U: int, cats: _Categories, ents: _Entities
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interest weights [U, C], favourite-word masks [U, C] and favourite entities [U, 4].

    Why vectorised per category: each category has its own Zipf tables, so all users
    interested in one category are looked up in one ``searchsorted`` instead of per user.
    """
    C = len(cats.names)
    n_int = rng.integers(2, 5, size=U)
    w_mat = np.zeros((U, C))
    fw_mat = np.zeros((U, C), dtype=np.uint64)
    fav_ent = np.full((U, 4), -2, dtype=np.int32)
    gumbel = rng.gumbel(size=(U, C)) + np.log(cats.prior) * 0.5  # interests ~ sqrt(prior)
    dir_w = rng.gamma(1.0, size=(U, 4))
    n_fav_e = rng.integers(2, 5, size=U)
    fe_cat_u = rng.random((U, 4))
    fe_u = rng.random((U, 4))
    fw_u = rng.random((U, 4, 2))
    cs = np.argsort(-gumbel, axis=1, kind="stable")[:, :4]  # [U, 4] interests, best first
    slot_ok = np.arange(4)[None, :] < n_int[:, None]  # [U, 4]
    wts = np.where(slot_ok, dir_w, 0.0)
    wts /= wts.sum(axis=1, keepdims=True)
    rows = np.arange(U)
    for j in range(4):
        w_mat[rows[slot_ok[:, j]], cs[slot_ok[:, j], j]] = wts[slot_ok[:, j], j]
    fe_slot = np.minimum((fe_cat_u * n_int[:, None]).astype(np.int64), n_int[:, None] - 1)
    fe_cat = np.take_along_axis(cs, fe_slot, axis=1)  # [U, 4] category of each favourite
    fe_ok = np.arange(4)[None, :] < n_fav_e[:, None]
    for c in range(C):  # vectorised per category: its own Zipf tables
        for j in range(4):
            m = slot_ok[:, j] & (cs[:, j] == c)
            idx = np.searchsorted(cats.word_cum[c], fw_u[m, j, :], side="right").astype(np.uint64)
            fw_mat[m, c] = (np.uint64(1) << idx[:, 0]) | (np.uint64(1) << idx[:, 1])
            m = fe_ok[:, j] & (fe_cat[:, j] == c)
            if len(ents.cat_ents[c]) and m.any():
                i = np.searchsorted(ents.ent_cum[c], fe_u[m, j], side="right")
                fav_ent[m, j] = ents.cat_ents[c][i]
    return w_mat, fw_mat, fav_ent


def _build_world(scale: Scale, ss: np.random.SeedSequence, progress: bool) -> _World:
    """The fixed world of a seed: entities, news and users from stream 0, histories from 1.

    Why one stream, drawn in this order (entities, news, users): ``content_logits`` rebuilds
    the world from ``synth.json``'s scale and seed alone, so the draw order is part of the
    data format; each builder draws only from ``rng``, in sequence.
    """
    rng = _child(ss, 0)
    cats = _categories()
    ents = _build_entities(rng, scale.entities, cats)
    news = _build_news(rng, scale.news, cats, ents, progress)
    users = _build_users(rng, scale.users, cats, ents)
    world = _World(
        n_cat=len(cats.names),
        cat_names=cats.names,
        sub_names=cats.sub_names,
        words=cats.words,
        ent_name=ents.ent_name,
        ent_type=ents.ent_type,
        ent_qid=ents.ent_qid,
        ent_conf=ents.ent_conf,
        cat_ents=ents.cat_ents,
        news_id=news.news_id,
        day=news.day,
        day_lo=news.day_lo,
        cat=news.cat,
        ent=news.ent,
        wmask=news.wmask,
        logpop=news.logpop,
        cumpop=news.cumpop,
        records=news.records,
        user_id=users.user_id,
        w_flat=users.w_flat,
        fw_flat=users.fw_flat,
        fav_ent=users.fav_ent,
        cum_act=users.cum_act,
        hist_ptr=np.zeros(len(users.user_id) + 1, dtype=np.int64),
        hist=np.zeros(0, dtype=np.int32),
    )
    _build_histories(world, _child(ss, 1), progress)
    return world


# --------------------------------------------------------------------------------------------
# Click model


def _logits(w: _World, u: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Logit of p(u, n) for aligned arrays of users and news (see module docstring)."""
    flat = u.astype(np.int64) * w.n_cat + w.cat[n]
    e = w.ent[n]  # [M, 3], -1 pad
    f = w.fav_ent[u]  # [M, 4], -2 pad (never equal to a news pad)
    ent_overlap = (e[:, :, None] == f[:, None, :]).sum(axis=(1, 2))
    word_overlap = np.bitwise_count(w.wmask[n] & w.fw_flat[flat])
    aff = w.w_flat[flat] + BETA_ENT * ent_overlap + BETA_WORD * word_overlap
    return BIAS + AFF * aff + POP * np.minimum(w.logpop[n], POP_CAP)


def _probs_q(w: _World, u: np.ndarray, n: np.ndarray) -> np.ndarray:
    """True click probabilities, quantised to 1/PROB_SCALE (int32 in [1, PROB_SCALE-1])."""
    out = np.empty(len(u), dtype=np.int32)
    for s in range(0, len(u), _PROB_CHUNK):
        x = _logits(w, u[s : s + _PROB_CHUNK], n[s : s + _PROB_CHUNK])
        p = 1.0 / (1.0 + np.exp(-x))
        out[s : s + _PROB_CHUNK] = np.clip(np.rint(p * PROB_SCALE), 1, PROB_SCALE - 1)
    return out


def _draw_news(rng: np.random.Generator, w: _World, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """One news per slot from index range [lo, hi), proportional to popularity."""
    a, b = w.cumpop[lo], w.cumpop[hi]
    x = a + rng.random(len(lo)) * (b - a)
    idx = np.searchsorted(w.cumpop, x, side="right") - 1
    return np.clip(idx, lo, hi - 1).astype(np.int32)


def _build_histories(w: _World, rng: np.random.Generator, progress: bool) -> None:
    """Fixed pre-window click histories: weighted sampling without replacement, weights p."""
    U = len(w.user_id)
    h = np.minimum(
        np.rint(np.exp(rng.normal(np.log(HIST_MEDIAN), HIST_SIGMA, size=U))), HIST_MAX
    ).astype(np.int64)
    h = np.maximum(h, 1)
    h[rng.random(U) < EMPTY_HISTORY_SHARE] = 0
    pool_hi = w.day_lo[1]
    N = len(w.news_id)
    lens = np.zeros(U, dtype=np.int64)
    parts: list[np.ndarray] = []
    chunk = 50_000
    prog = Progress("synth: histories", U, unit="users")
    prog.enabled = prog.enabled and progress
    for a in range(0, U, chunk):
        b = min(a + chunk, U)
        hu = h[a:b]
        m = np.where(hu > 0, 3 * hu + 4, 0)
        uu = np.repeat(np.arange(a, b, dtype=np.int64), m)
        nn = _draw_news(rng, w, np.zeros(len(uu), np.int64), np.full(len(uu), pool_hi))
        p = _probs_q(w, uu, nn).astype(np.float64) / PROB_SCALE
        key = np.log(rng.random(len(uu))) / p  # Efraimidis-Spirakis: largest keys win
        if len(uu):
            # distinct (user, news) pairs, each with its best key
            comp = (uu - a) * N + nn
            o = np.argsort(comp, kind="stable")
            comp, key = comp[o], key[o]
            starts = np.flatnonzero(np.concatenate([[True], comp[1:] != comp[:-1]]))
            key = np.maximum.reduceat(key, starts)
            uu, nn = comp[starts] // N + a, comp[starts] % N
            # the h best keys of each user
            o = np.lexsort((-key, uu))
            uu, nn = uu[o], nn[o]
            rank = np.arange(len(uu)) - np.searchsorted(uu, uu, side="left")
            keep = rank < h[uu]
            uu, nn = uu[keep], nn[keep]
            # oldest publication day first (most recent last), random order within a day
            o = np.argsort(
                ((uu - a) * 16 + (w.day[nn] + PRE_DAYS)) * (1 << 20)
                + rng.integers(0, 1 << 20, size=len(uu)),
                kind="stable",
            )
            uu, nn = uu[o], nn[o]
        lens[a:b] = np.bincount(uu - a, minlength=b - a)
        parts.append(nn.astype(np.int32))
        prog.update(b - a)
    prog.close()
    w.hist_ptr = np.concatenate([[0], np.cumsum(lens)])
    w.hist = np.concatenate(parts) if parts else np.zeros(0, np.int32)


# --------------------------------------------------------------------------------------------
# Impressions


@dataclass
class _Block:
    users: np.ndarray  # int64 [n]
    secs: np.ndarray  # int64 [n], seconds into the day
    ptr: np.ndarray  # int64 [n+1]
    cand: np.ndarray  # int32 [M]
    prob_q: np.ndarray  # int32 [M], p * PROB_SCALE
    labels: np.ndarray  # uint8 [M]


def _sample_labels(rng: np.random.Generator, ptr: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Bernoulli(p) labels conditioned on at least one click per impression, sampled exactly.

    First click k ~ p_k prod_{j<k}(1-p_j) / P(any); before k no click; after k independent.
    """
    K = np.diff(ptr)
    starts = ptr[:-1]
    lq = np.log1p(-p)
    cs = np.cumsum(lq)
    before = np.concatenate([[0.0], cs])[starts]
    L = cs - np.repeat(before, K)  # log prod_{j<=k}(1-p_j) within the impression
    LK = L[ptr[1:] - 1]
    u = rng.random(len(K))
    t = np.log1p(-u * -np.expm1(LK))  # log(1 - u * P(any))
    k = np.add.reduceat((L > np.repeat(t, K)).astype(np.int64), starts)
    k = np.minimum(k, K - 1)
    pos = np.arange(len(p)) - np.repeat(starts, K)
    kk = np.repeat(k, K)
    bern = rng.random(len(p)) < p
    return np.where(pos < kk, False, np.where(pos == kk, True, bern)).astype(np.uint8)


def _day_blocks(w: _World, d: int, n_imp: int, rng: np.random.Generator) -> Iterator[_Block]:
    """All impressions of day d (sorted by time), in blocks of ``_BLOCK``."""
    users = np.searchsorted(w.cum_act, rng.random(n_imp) * w.cum_act[-1], side="right")
    users = np.minimum(users, len(w.user_id) - 1).astype(np.int64)
    secs = rng.integers(0, 86_400, size=n_imp)
    o = np.argsort(secs, kind="stable")
    users, secs = users[o], secs[o]
    f_lo, f_hi = w.day_lo[d], w.day_lo[d + 1]
    o_lo = w.day_lo.get(d - LIVE_DAYS + 1, 0)
    n_live = f_hi - o_lo
    max_k = max(2, min(MAX_CAND, n_live // 3))
    for s in range(0, n_imp, _BLOCK):
        bu, bs = users[s : s + _BLOCK], secs[s : s + _BLOCK]
        n = len(bu)
        K = np.minimum(rng.integers(MIN_CAND, MAX_CAND + 1, size=n), max_k)
        imp_of = np.repeat(np.arange(n, dtype=np.int64), K)
        fresh = rng.random(len(imp_of)) < FRESH_SHARE
        lo = np.where(fresh, f_lo, o_lo)
        hi = np.where(fresh, f_hi, f_lo)
        cand = _draw_news(rng, w, lo, hi)
        keep = np.ones(len(cand), dtype=bool)
        sub = np.arange(len(cand))  # slots of impressions that may hold duplicates
        for _round in range(40):  # redraw duplicates within an impression
            key = imp_of[sub] * (w.cat.shape[0] + 1) + cand[sub]
            o = np.argsort(key, kind="stable")
            is_dup = key[o[1:]] == key[o[:-1]]
            if not is_dup.any():
                break
            where = np.sort(sub[o[1:][is_dup]])
            if _round == 39:
                keep[where] = False  # give up: drop the (rare) remaining duplicates
                break
            cand[where] = _draw_news(rng, w, lo[where], hi[where])
            dirty = np.zeros(n, dtype=bool)
            dirty[imp_of[where]] = True
            sub = np.flatnonzero(dirty[imp_of])
        if not keep.all():
            cand, imp_of = cand[keep], imp_of[keep]
            K = np.bincount(imp_of, minlength=n)
        ptr = np.concatenate([[0], np.cumsum(K)])
        pq = _probs_q(w, bu[imp_of], cand)
        labels = _sample_labels(rng, ptr, pq.astype(np.float64) / PROB_SCALE)
        yield _Block(bu, bs, ptr, cand, pq, labels)


# --------------------------------------------------------------------------------------------
# Ceiling metrics: the evaluator's own code and tie rule (mtrec_dist.metrics, numpy only),
# so the ceiling is what `mtrec evaluate` and `mtrec score` would report for the true
# probabilities (quantized probabilities do tie; tied candidates rank in candidate order).


class _MetricSums:
    """Running sums of the per-impression metrics over the blocks of a split."""

    def __init__(self) -> None:
        self.sums = np.zeros(len(METRICS))
        self.defined = np.zeros(len(METRICS), dtype=np.int64)
        self.n = 0

    def add(self, b: _Block) -> None:
        sizes = np.diff(b.ptr)
        per = ranked_impression_metrics(b.labels, b.prob_q.astype(np.float64), sizes)  # [m, 4]
        ok = ~np.isnan(per)
        self.sums += np.where(ok, per, 0.0).sum(axis=0)
        self.defined += ok.sum(axis=0)
        self.n += len(b.users)

    def result(self) -> dict:
        mean = self.sums / np.maximum(self.defined, 1)
        out = {name: float(mean[j]) for j, name in enumerate(METRICS)}
        n_auc = int(self.defined[0])
        out.update(
            impressions=self.n, auc_impressions=n_auc, auc_skipped_all_same_label=self.n - n_auc
        )
        return out


# --------------------------------------------------------------------------------------------
# Writing


def _fmt_probs(q: list[int]) -> str:
    return ",".join([f"0.{v:07d}" for v in q])


@dataclass
class _SplitState:
    ref: np.ndarray  # bool [N]: news referenced by the split's behaviors
    impressions: int = 0
    candidates: int = 0
    clicks: int = 0
    empty_history: int = 0
    users: np.ndarray | None = None  # bool [U]
    cold_vs_train: int = 0
    cold_vs_seen: int = 0


def _split_impressions(
    w: _World,
    split: str,
    counts: list[int],
    ss: np.random.SeedSequence,
    st: _SplitState,
    seen_before: tuple[np.ndarray | None, np.ndarray | None],
    metrics: _MetricSums | None,
    truth_dir: Path,
    prog: Progress,
) -> Iterator[Impression]:
    """Generate one split day by day, write its truth files, and yield its impressions."""
    labeled = split != "test"
    train_ref, seen_ref = seen_before
    imp_id = 0
    with contextlib.ExitStack() as files:  # truth files appear only if the split completes
        probs_f = truth_f = None
        if split != "train":
            probs_f = files.enter_context(atomic_open(truth_dir / f"{split}_probs.tsv", "w"))
        if split == "test":
            truth_f = files.enter_context(atomic_open(truth_dir / "test_truth.txt", "w"))
        for d, n_imp in zip(SPLIT_DAYS[split], counts):
            base = START + dt.timedelta(days=d - 1)
            for b in _day_blocks(w, d, n_imp, _child(ss, 2, d)):
                n = len(b.users)
                ids = range(imp_id + 1, imp_id + n + 1)
                imp_id += n
                # bookkeeping: referenced news, users, cold start, metrics, truth files
                st.ref[b.cand] = True
                hs, he = w.hist_ptr[b.users], w.hist_ptr[b.users + 1]
                hl = he - hs
                hidx = np.repeat(hs - np.concatenate([[0], np.cumsum(hl)[:-1]]), hl)
                hidx += np.arange(int(hl.sum()))
                st.ref[w.hist[hidx]] = True
                st.users[b.users] = True
                st.impressions += n
                st.candidates += len(b.cand)
                st.clicks += int(b.labels.sum())
                st.empty_history += int((hl == 0).sum())
                if train_ref is not None:
                    st.cold_vs_train += int((~train_ref[b.cand]).sum())
                if seen_ref is not None:
                    st.cold_vs_seen += int((~seen_ref[b.cand]).sum())
                if metrics is not None:
                    metrics.add(b)
                ptr = b.ptr.tolist()
                if probs_f is not None:
                    q = b.prob_q.tolist()
                    probs_f.write(
                        "".join(
                            f"{i}\t{_fmt_probs(q[ptr[j] : ptr[j + 1]])}\n"
                            for j, i in enumerate(ids)
                        )
                    )
                labs = b.labels.tolist()
                if truth_f is not None:
                    truth_f.write(
                        "".join(
                            f"{i} [{','.join(map(str, labs[ptr[j] : ptr[j + 1]]))}]\n"
                            for j, i in enumerate(ids)
                        )
                    )
                users = b.users.tolist()
                secs = b.secs.tolist()
                # one fancy index per block, then plain list slices per impression
                cand_s = w.news_id[b.cand].tolist()
                hist_s = w.news_id[w.hist[hidx]].tolist()
                hp = np.concatenate([[0], np.cumsum(hl)]).tolist()
                for j, i in enumerate(ids):
                    a, e = ptr[j], ptr[j + 1]
                    yield Impression(
                        impression_id=str(i),
                        user_id=w.user_id[users[j]],
                        time=base + dt.timedelta(seconds=secs[j]),
                        history=hist_s[hp[j] : hp[j + 1]],
                        candidates=cand_s[a:e],
                        labels=labs[a:e] if labeled else None,
                    )
                prog.update(n)


FILES = (
    "train/news.tsv",
    "train/behaviors.tsv",
    "dev/news.tsv",
    "dev/behaviors.tsv",
    "test/news.tsv",
    "test/behaviors.tsv",
    "truth/dev_probs.tsv",
    "truth/test_probs.tsv",
    "truth/test_truth.txt",
    "train/entity_embedding.vec",
    "dev/entity_embedding.vec",
    "test/entity_embedding.vec",
)

ENT_VEC_DIM = 100  # MIND's TransE entity vectors are 100-d
ENT_VEC_MISSING = 0.1  # share of entities written without a vector (coverage is never 100%)


def write_entity_vectors(
    path: Path, w: _World, news: np.ndarray, seed: int, dim: int = ENT_VEC_DIM
) -> int:
    """Write ``entity_embedding.vec`` in MIND's format for the entities of the news ``news``
    (a bool mask over ``w``'s news); returns the number of vectors written.

    MIND ships one such file per split, holding 100-d TransE vectors of that split's entities
    (``Q42<TAB>v1<TAB>...<TAB>v100<TAB>``). Here a vector is the mean of its categories'
    centroids plus noise (unit-variance centroids, noise sd 0.5), so entities of one category
    lie close together as related entities do in a knowledge graph; ``ENT_VEC_MISSING`` of the
    entities (the same ones in every split) get no vector, as some MIND entities have none.
    Drawn from a generator of its own (seeded by ``seed``), so the other files do not change.
    """
    E = len(w.ent_qid)
    rng = np.random.default_rng([int(seed), 0x7EC])
    centroids = rng.standard_normal((w.n_cat, dim))
    vecs = 0.5 * rng.standard_normal((E, dim))
    count = np.zeros(E)
    for c, ents in enumerate(w.cat_ents):
        vecs[ents] += centroids[c]
        count[ents] += 1
    vecs /= np.sqrt(np.maximum(count, 1))[:, None]
    has_vec = rng.random(E) >= ENT_VEC_MISSING
    used = np.zeros(E, dtype=bool)
    ents = w.ent[news]
    used[ents[ents >= 0]] = True
    rows = np.flatnonzero(used & has_vec)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i in rows.tolist():
            f.write(w.ent_qid[i] + "\t" + "\t".join(f"{x:.6f}" for x in vecs[i]) + "\t\n")
    return int(rows.size)


def _split_counts(total: int, n_days: int) -> list[int]:
    base, rem = divmod(total, n_days)
    return [base + (1 if i < rem else 0) for i in range(n_days)]


def _write_splits(
    w: _World, sc: Scale, seed: int, out: Path, progress: bool
) -> tuple[dict[str, _SplitState], dict[str, dict], np.ndarray]:
    """Write train, dev and test in that order; return their states, ceilings and news seen.

    Why in this order: a split's cold-start shares compare its candidates with the news
    referenced by train and by all splits written before it (``seen_ref``); the draws do not
    depend on the order, since every day has its own child stream.
    """
    ss = np.random.SeedSequence(seed)  # the same root sequence generate() built the world from
    N, U = len(w.records), len(w.user_id)
    total = sc.train + sc.dev + sc.test
    prog = Progress("synth: impressions", total, unit="imp")
    prog.enabled = prog.enabled and progress
    states: dict[str, _SplitState] = {}
    ceiling: dict[str, dict] = {}
    seen_ref = np.zeros(N, dtype=bool)
    for split, n_total in (("train", sc.train), ("dev", sc.dev), ("test", sc.test)):
        st = _SplitState(ref=np.zeros(N, dtype=bool), users=np.zeros(U, dtype=bool))
        states[split] = st
        metrics = _MetricSums() if split != "train" else None
        train_ref = states["train"].ref if split != "train" else None
        counts = _split_counts(n_total, len(SPLIT_DAYS[split]))
        imps = _split_impressions(
            w,
            split,
            counts,
            ss,
            st,
            (train_ref, seen_ref.copy() if split != "train" else None),
            metrics,
            out / "truth",
            prog,
        )
        mind.write_behaviors(out / split / "behaviors.tsv", imps)
        mind.write_news(out / split / "news.tsv", (w.records[i] for i in np.flatnonzero(st.ref)))
        write_entity_vectors(out / split / "entity_embedding.vec", w, st.ref, int(seed))
        seen_ref |= st.ref
        if metrics is not None:
            ceiling[split] = metrics.result()
    prog.close()
    return states, ceiling, seen_ref


def _split_info(split: str, st: _SplitState) -> dict:
    """One split's entry of ``synth.json``'s counts.

    Why cold-start shares only for dev and test: they are measured against the splits before,
    and train has none.
    """
    info = {
        "impressions": st.impressions,
        "news": int(st.ref.sum()),
        "users": int(st.users.sum()),
        "candidates": st.candidates,
        "clicks": st.clicks,
        "ctr": st.clicks / max(st.candidates, 1),
        "empty_history_impressions": st.empty_history,
        "days": [
            (START + dt.timedelta(days=d - 1)).strftime("%m/%d/%Y") for d in SPLIT_DAYS[split]
        ],
    }
    if split != "train":
        info["cold_start_share_vs_train"] = st.cold_vs_train / max(st.candidates, 1)
        info["cold_start_share_vs_earlier_splits"] = st.cold_vs_seen / max(st.candidates, 1)
    return info


def _summary(
    out: Path,
    scale: str,
    seed: int,
    w: _World,
    splits: tuple[dict[str, _SplitState], dict[str, dict], np.ndarray],
) -> dict:
    """The content of ``synth.json``: counts, ceilings, click-model constants, file hashes.

    Why hashes of the written files: same seed -> byte-identical files is the determinism
    contract, and the hashes let anyone check a copy of the data against it.
    """
    states, ceiling, seen_ref = splits
    return {
        "format": "MIND",
        "generator": "mtrec_dist.data.synthetic",
        "seed": int(seed),
        "scale": scale,
        "counts": {
            "news_total": len(w.records),
            "users_total": len(w.user_id),
            "entities": len(w.ent_name),
            "news_all_splits": int(seen_ref.sum()),
            "history_mean_len": float(np.diff(w.hist_ptr).mean()),
            **{s: _split_info(s, states[s]) for s in ("train", "dev", "test")},
        },
        "ceiling": ceiling,
        "click_model": {
            "bias": BIAS,
            "affinity": AFF,
            "beta_entity": BETA_ENT,
            "beta_word": BETA_WORD,
            "popularity": POP,
            "popularity_cap": POP_CAP,
            "pop_alpha": POP_ALPHA,
            "fresh_share": FRESH_SHARE,
            "live_days": LIVE_DAYS,
            "labels": "Bernoulli(p) conditioned on >= 1 click per impression",
        },
        "sha256": {f: sha256_file(out / f) for f in FILES},
    }


def generate(out: str | Path, scale: str = "small", seed: int = 0, progress: bool = True) -> dict:
    """Write a synthetic MIND dataset into ``out`` and return the content of ``synth.json``.

    Layout: ``train|dev|test/{news,behaviors}.tsv`` (MIND format; test unlabeled),
    ``truth/{dev,test}_probs.tsv`` (``ImpressionID<TAB>p1,p2,...``, true click probabilities),
    ``truth/test_truth.txt`` (``ImpressionID [0,1,...]``), ``synth.json``.
    """
    if scale not in SCALES:
        raise ConfigError(f"scale: expected one of {list(SCALES)}, got {scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
    sc = SCALES[scale]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ss = np.random.SeedSequence(int(seed))
    w = _build_world(sc, ss, progress)
    splits = _write_splits(w, sc, int(seed), out, progress)
    result = _summary(out, scale, seed, w, splits)
    atomic_write_json(out / "synth.json", result)
    return result


# --------------------------------------------------------------------------------------------
# What a content-only model can reach


def content_logits(root: str | Path, split: str) -> Iterator[tuple[str, np.ndarray]]:
    """``(impression id, logits)`` of the planted click model WITHOUT its popularity term, per
    impression of ``root/<split>/behaviors.tsv``, in file order.

    Why: popularity is learnable from click counts only, and no model here reads click counts;
    the affinity part (category, entities, words) is all in the title and category. Ranking by
    these logits is the best a model that reads only the news content can do (short of
    memorising which titles were popular in training), so benchmarks report the lift fraction
    against both this ceiling and the full one. The world is rebuilt from ``synth.json``'s
    scale and seed (same seed -> same world, see "Determinism" above).
    """
    info = json.loads((Path(root) / "synth.json").read_text(encoding="utf-8"))
    w = _build_world(SCALES[info["scale"]], np.random.SeedSequence(int(info["seed"])), False)
    users = {u: i for i, u in enumerate(w.user_id)}
    news = {n: i for i, n in enumerate(w.news_id.tolist())}
    for imp in mind.iter_behaviors(Path(root) / split / "behaviors.tsv"):
        n = np.array([news[c] for c in imp.candidates], dtype=np.int64)
        u = np.full(len(n), users[imp.user_id], dtype=np.int64)
        yield imp.impression_id, _logits(w, u, n) - POP * np.minimum(w.logpop[n], POP_CAP)
