"""A seeded synthetic shopping world: catalogue, users with latent intents, behaviour, and the queries.

No real e-commerce query log can be had offline (../shared/papers/recgpt_mobile.md), so this generator
writes data in the format of `envs/nextquery/data.py` from a small generative story:

* **Catalogue** (`make_catalog`): the categories of `CATEGORIES` (26, in six domains), each with its
  attribute vocabularies (e.g. colour x feature), brands from its domain, synonyms that queries use, a
  price range and complementary categories (smartphone -> phone case). Items get one value per attribute,
  a brand, a price band and a generated title (brand + product line + attributes + category, in one of
  several layouts, with filler words), so a title is longer and noisier than a query.
* **Users**: persistent traits (a favourite colour, a price band, how brand-loyal they are) and a latent
  **intent** per session: `{"category", "attributes": {key: value} (1-2 preferred values), "brand" (or
  None), "price_band"}`.
* **Sessions** (4-12 events, minutes apart; sessions 0.5-5 days apart): each event is an on-intent item
  (right category; each preferred attribute matched with a probability that rises during the session,
  as a shopper narrows down: 0.45 in the first half, 0.85 in the second; the preferred brand with
  probability 0.6) or, with probability 0.2, a noise click off-intent. Actions: click >> cart > favorite
  > purchase (on-intent 0.72 / 0.13 / 0.09 / 0.06; noise 0.95 click / 0.05 favorite).
* **The query** that ends each session is written from the intent at its end, not from any item: a
  category word (the category or one of its synonyms), a random subset of the preferred attribute values,
  the brand (if the intent has one, with probability 0.6), sometimes a price word, in one of several
  word orders. It always names the category or a synonym (a test checks it).
* **Drift and complements**: a session is a *purchase session* with probability `complement_share`
  (0.27, for the 24 categories that have complements: ~26% of the rows, the paper's 60 : 20 behaviour :
  complementary mix): its last on-intent event is a purchase and
  its query is for a complementary category (phone -> "phone case", same brand if the domain matches and
  the user is loyal, the favourite colour if the complement has one): `target_kind = "complementary"`.
  The next session continues that intent. Otherwise the next session keeps the category with
  probability `stay` (0.45; one attribute may change) or drifts to a random category.

Why it is hard for heuristics: the 20-event history usually spans the previous session too, so the
most frequent category is often the old interest; the last item's title is on-intent only ~80% of the
time, carries brand, product line and non-preferred attribute values, and the query uses synonyms; the
preferred attributes show only statistically (the value the user keeps choosing); a complementary query
names a category that is absent from the history. A model that reads the last events, counts the
recurring attribute values and learns the complement pairs can do far better.

`generate(config)` returns `World(catalog, users)`, each user a list of sessions; `rows_of(user)` and
`stream_of(user)` turn one user's sessions into example rows and a drift-trigger stream. Everything
is a pure function of `WorldConfig` (a `random.Random(seed)`; no global state), so the same seed gives
byte-identical files.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CATEGORIES", "Category", "World", "WorldConfig", "generate", "make_catalog", "rows_of", "stream_of"]

ACTIONS = ("click", "cart", "favorite", "purchase")
ON_INTENT_ACTIONS = (0.72, 0.13, 0.09, 0.06)
NOISE_ACTIONS = (0.95, 0.0, 0.05, 0.0)
PRICE_BANDS = ("low", "mid", "high")
PRICE_WORDS = {"low": ("cheap", "budget", "affordable"), "high": ("premium", "high end", "luxury")}
START_TIME = 1_700_000_000  # 2023-11-14 UTC: unix seconds, as real logs


@dataclass(frozen=True)
class Category:
    name: str  # canonical, lowercase: also an item's `category`
    domain: str  # brands are shared within a domain
    synonyms: tuple[str, ...]  # words a query may use instead of the name
    attributes: dict[str, tuple[str, ...]]
    price: tuple[int, int]  # euros, low..high
    complements: tuple[str, ...] = ()


def _c(name, domain, synonyms, attributes, price, complements=()):
    return Category(name, domain, tuple(synonyms), {k: tuple(v) for k, v in attributes.items()}, price,
                    tuple(complements))


COLOURS = ("black", "white", "blue", "red", "green", "grey")
CATEGORIES: dict[str, Category] = {c.name: c for c in [
    _c("smartphone", "electronics", ["phone", "mobile phone", "android phone"],
       {"colour": COLOURS[:4], "storage": ["128gb", "256gb", "512gb"]}, (150, 1100),
       ["phone case", "screen protector", "wireless earbuds", "power bank"]),
    _c("phone case", "electronics", ["phone cover", "case for phone", "protective case"],
       {"colour": ["black", "clear", "red", "pink", "blue"], "material": ["silicone", "leather", "rugged"]}, (8, 45),
       ["screen protector"]),
    _c("screen protector", "electronics", ["tempered glass", "screen guard", "glass protector"],
       {"finish": ["matte", "glossy", "privacy"], "pack": ["single", "2 pack", "3 pack"]}, (5, 25), ["phone case"]),
    _c("wireless earbuds", "electronics", ["bluetooth earbuds", "earphones", "wireless headphones"],
       {"colour": COLOURS[:3], "feature": ["noise cancelling", "waterproof", "sport", "long battery"]}, (20, 280),
       ["power bank"]),
    _c("power bank", "electronics", ["portable charger", "battery pack", "phone charger"],
       {"capacity": ["10000mah", "20000mah", "30000mah"], "feature": ["fast charging", "slim", "wireless"]}, (15, 90),
       ["wireless earbuds"]),
    _c("laptop", "electronics", ["notebook", "notebook computer", "ultrabook"],
       {"screen": ["13 inch", "14 inch", "15 inch", "17 inch"], "feature": ["gaming", "lightweight", "touchscreen"]},
       (350, 2400), ["laptop bag", "wireless mouse", "usb c hub"]),
    _c("laptop bag", "office", ["laptop backpack", "laptop sleeve", "notebook bag"],
       {"colour": COLOURS[:4], "material": ["nylon", "leather", "canvas"]}, (15, 120), ["wireless mouse"]),
    _c("wireless mouse", "electronics", ["bluetooth mouse", "computer mouse", "cordless mouse"],
       {"colour": COLOURS[:3], "feature": ["silent", "ergonomic", "gaming"]}, (10, 90), ["usb c hub"]),
    _c("usb c hub", "electronics", ["usb hub", "docking station", "usb adapter"],
       {"ports": ["4 port", "7 port", "10 port"], "feature": ["hdmi", "ethernet", "sd card"]}, (15, 110),
       ["laptop bag"]),
    _c("running shoes", "sport", ["trainers", "running sneakers", "jogging shoes"],
       {"colour": COLOURS, "feature": ["waterproof", "trail", "lightweight", "cushioned"]}, (40, 200),
       ["sports socks", "fitness tracker", "water bottle"]),
    _c("sports socks", "sport", ["running socks", "athletic socks", "ankle socks"],
       {"colour": COLOURS[:3], "material": ["cotton", "merino", "bamboo"]}, (5, 25), ["running shoes"]),
    _c("fitness tracker", "sport", ["activity tracker", "smart band", "fitness watch"],
       {"colour": COLOURS[:4], "feature": ["heart rate", "gps", "sleep tracking"]}, (25, 250), ["water bottle"]),
    _c("water bottle", "sport", ["drinking bottle", "sports bottle", "flask"],
       {"colour": COLOURS, "material": ["steel", "glass", "plastic"]}, (6, 45), ["yoga mat", "backpack"]),
    _c("yoga mat", "sport", ["exercise mat", "fitness mat", "pilates mat"],
       {"colour": ["purple", "blue", "green", "black"], "feature": ["non slip", "extra thick", "foldable"]}, (12, 90),
       ["water bottle"]),
    _c("coffee machine", "home", ["coffee maker", "espresso machine", "coffee brewer"],
       {"colour": ["black", "silver", "red"], "type": ["capsule", "drip", "bean to cup"]}, (40, 900),
       ["coffee beans", "milk frother"]),
    _c("coffee beans", "home", ["whole bean coffee", "espresso beans", "coffee"],
       {"roast": ["light roast", "medium roast", "dark roast"], "origin": ["colombian", "ethiopian", "brazilian"]},
       (6, 40), ["milk frother"]),
    _c("milk frother", "home", ["milk foamer", "frother", "milk steamer"],
       {"colour": ["black", "silver", "white"], "type": ["handheld", "electric", "induction"]}, (10, 120),
       ["coffee beans"]),
    _c("frying pan", "home", ["skillet", "fry pan", "saute pan"],
       {"size": ["20cm", "24cm", "28cm"], "material": ["cast iron", "stainless steel", "non stick"]}, (15, 150)),
    _c("backpack", "outdoor", ["rucksack", "daypack", "hiking bag"],
       {"colour": COLOURS, "feature": ["waterproof", "anti theft", "hiking"]}, (20, 180), ["water bottle"]),
    _c("tent", "outdoor", ["camping tent", "dome tent", "hiking tent"],
       {"capacity": ["2 person", "4 person", "6 person"], "feature": ["waterproof", "ultralight", "pop up"]},
       (40, 600), ["sleeping bag", "camping lantern"]),
    _c("sleeping bag", "outdoor", ["sleep sack", "camping sleeping bag", "mummy bag"],
       {"season": ["summer", "3 season", "winter"], "colour": ["green", "blue", "red"]}, (20, 250),
       ["camping lantern", "tent"]),
    _c("camping lantern", "outdoor", ["led lantern", "camp light", "tent light"],
       {"feature": ["rechargeable", "solar", "dimmable"]}, (8, 60), ["sleeping bag"]),
    _c("winter jacket", "fashion", ["winter coat", "puffer jacket", "parka"],
       {"colour": COLOURS, "feature": ["hooded", "waterproof", "down"]}, (50, 400), ["gloves"]),
    _c("gloves", "fashion", ["winter gloves", "mittens", "touchscreen gloves"],
       {"colour": COLOURS[:4], "material": ["wool", "leather", "fleece"]}, (8, 70), ["winter jacket"]),
    _c("desk lamp", "office", ["reading lamp", "table lamp", "led desk lamp"],
       {"colour": ["black", "white", "silver"], "feature": ["dimmable", "clamp", "wireless charging"]}, (15, 120),
       ["office chair"]),
    _c("office chair", "office", ["desk chair", "ergonomic chair", "computer chair"],
       {"colour": ["black", "grey", "blue"], "feature": ["mesh", "lumbar support", "reclining"]}, (60, 700),
       ["desk lamp"]),
]}

BRANDS = {
    "electronics": ["Lumora", "Vexa", "Kitori", "Pennard", "Zentro", "Oblique"],
    "office": ["Deskwell", "Pennard", "Arbo", "Quillon"],
    "sport": ["Nordhaus", "Stridex", "Kinetiq", "Velo", "Alpenway"],
    "home": ["Casamo", "Brewline", "Ferrotta", "Hearthly", "Molino"],
    "outdoor": ["Trailcraft", "Summitra", "Wildmoor", "Nordhaus", "Alpenway"],
    "fashion": ["Fjelde", "Marlowe", "Nordhaus", "Corvina"],
}
LINE_SYLLABLES = ("aero", "nova", "flex", "core", "peak", "zen", "volt", "terra", "pulse", "max", "air", "lite")
FILLER = ("new", "2024 model", "original", "bestseller", "free delivery", "for men and women", "classic",
          "limited edition")

# query word orders: {c} category word, {a} attribute words, {b} brand, {p} price word
QUERY_TEMPLATES = ("{p} {b} {a} {c}", "{p} {a} {c} {b}", "{b} {c} {a}", "{p} {c} {a}", "{a} {c} {b}",
                   "best {a} {c}", "{c} {a} {b}", "{b} {a} {c} {p}")


@dataclass
class WorldConfig:
    """Everything the world depends on (the build writes it into stats.json)."""

    seed: int = 0
    n_users: int = 1000
    items_per_category: int = 120
    sessions: tuple[int, int] = (3, 8)  # per user, inclusive
    events_per_session: tuple[int, int] = (4, 12)
    noise: float = 0.2  # share of off-intent clicks
    complement_share: float = 0.27  # purchase sessions (of categories with complements): complementary queries
    stay: float = 0.45  # next session keeps the category (else drifts)
    brand_loyal: float = 0.5  # share of users with a brand preference in each intent
    history_len: int = 20  # events in a row's history (most recent)
    categories: tuple[str, ...] | None = None  # a subset of CATEGORIES (tiny test worlds); None: all

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class World:
    catalog: list[dict]
    users: list[dict] = field(default_factory=list)  # {"user_id", "traits", "sessions": [...]}


# ----------------------------------------------------------------------------- catalogue


def _title(rng: random.Random, cat: Category, brand: str, attrs: dict[str, str]) -> str:
    line = f"{rng.choice(LINE_SYLLABLES).capitalize()}{rng.choice(LINE_SYLLABLES)} {rng.randint(1, 9)}"
    values = list(attrs.values())
    rng.shuffle(values)
    noun = cat.name if rng.random() < 0.75 else rng.choice(cat.synonyms)
    layout = rng.randrange(4)
    if layout == 0:
        title = f"{brand} {line} {noun}, {', '.join(values)}"
    elif layout == 1:
        title = f"{brand} {' '.join(values)} {noun} {line}"
    elif layout == 2:
        title = f"{line} {noun} by {brand} ({' / '.join(values)})"
    else:
        title = f"{brand} {noun} {line} - {' - '.join(values)}"
    if rng.random() < 0.5:
        title += f", {rng.choice(FILLER)}"
    return title


def make_catalog(cfg: WorldConfig, rng: random.Random) -> list[dict]:
    """Items in the contract's format (`item_id`, `title`, `category`, `brand`, `attributes`, `tags`) plus
    `price` and `price_band`; ids `i00000`... in category order."""
    items = []
    for name in _category_names(cfg):
        cat = CATEGORIES[name]
        brands = BRANDS[cat.domain]
        lo, hi = cat.price
        for _ in range(cfg.items_per_category):
            attrs = {k: rng.choice(v) for k, v in cat.attributes.items()}
            brand = rng.choice(brands)
            band = rng.choice(PRICE_BANDS)
            third = (hi - lo) / 3
            start = lo + PRICE_BANDS.index(band) * third
            price = round(start + rng.random() * third, 2)
            items.append({
                "item_id": f"i{len(items):05d}", "title": _title(rng, cat, brand, attrs), "category": name,
                "brand": brand, "attributes": attrs, "tags": [name, brand, *attrs.values()],
                "price": price, "price_band": band,
            })  # fmt: skip
    return items


def _category_names(cfg: WorldConfig) -> list[str]:
    names = list(cfg.categories or CATEGORIES)
    unknown = [n for n in names if n not in CATEGORIES]
    if unknown:
        raise ValueError(f"WorldConfig.categories: unknown {unknown}; choose from {sorted(CATEGORIES)}")
    return names


# ----------------------------------------------------------------------------- users and sessions


class _Index:
    """Items by category, for drawing on- and off-intent items fast."""

    def __init__(self, catalog: list[dict]):
        self.by_cat: dict[str, list[dict]] = {}
        for it in catalog:
            self.by_cat.setdefault(it["category"], []).append(it)
        self.cats = list(self.by_cat)
        self.all = catalog


def _new_intent(rng: random.Random, cat_name: str, traits: dict, brand: str | None = None) -> dict:
    cat = CATEGORIES[cat_name]
    keys = list(cat.attributes)
    n_pref = 1 if len(keys) == 1 else rng.choice((1, 2, 2))
    chosen = sorted(rng.sample(keys, n_pref), key=keys.index)
    prefs = {}
    for k in chosen:
        vocab = cat.attributes[k]
        # the persistent favourite colour carries across categories: a cross-session signal
        prefs[k] = traits["colour"] if k == "colour" and traits["colour"] in vocab else rng.choice(vocab)
    if brand is None and rng.random() < traits["brand_loyalty"]:
        brand = rng.choice(BRANDS[cat.domain])
    return {"category": cat_name, "attributes": prefs, "brand": brand, "price_band": traits["price_band"]}


def _pick_item(rng: random.Random, index: _Index, intent: dict, match_p: float) -> dict:
    pool = index.by_cat[intent["category"]]
    want = {k: v for k, v in intent["attributes"].items() if rng.random() < match_p}
    brand = intent["brand"] if intent["brand"] and rng.random() < 0.6 else None
    band = intent["price_band"] if rng.random() < 0.5 else None
    for _ in range(3):  # relax one constraint at a time if nothing fits
        fit = [it for it in pool if all(it["attributes"].get(k) == v for k, v in want.items())
               and (brand is None or it["brand"] == brand) and (band is None or it["price_band"] == band)]
        if fit:
            return rng.choice(fit)
        if band is not None:
            band = None
        elif brand is not None:
            brand = None
        else:
            want = {}
    return rng.choice(pool)


def _action(rng: random.Random, probs: tuple[float, ...]) -> str:
    return rng.choices(ACTIONS, weights=probs)[0]


def _query(rng: random.Random, intent: dict) -> str:
    cat = CATEGORIES[intent["category"]]
    word = cat.name if rng.random() < 0.5 else rng.choice(cat.synonyms)
    values = [v for v in intent["attributes"].values() if rng.random() < 0.75]
    rng.shuffle(values)
    brand = intent["brand"] if intent["brand"] and rng.random() < 0.6 else ""
    price = rng.choice(PRICE_WORDS[intent["price_band"]]) if intent["price_band"] in PRICE_WORDS and rng.random() < 0.25 else ""
    template = rng.choice(QUERY_TEMPLATES)
    if template.startswith("best") and not values:
        template = "{a} {c}"
    text = template.format(c=word, a=" ".join(values), b=brand, p=price)
    return " ".join(text.lower().split())


def _next_items(rng: random.Random, index: _Index, intent: dict, k: int = 3) -> list[str]:
    """What the user engages with after the query: items fitting the intent's category, its preferred
    attributes and brand (relaxed one by one when too few fit)."""
    pool = index.by_cat[intent["category"]]
    prefs, brand = dict(intent["attributes"]), intent["brand"]
    fit: list[dict] = []
    for relax in range(3):
        fit = [it for it in pool if all(it["attributes"].get(a) == v for a, v in prefs.items())
               and (brand is None or it["brand"] == brand)]
        if len(fit) >= k:
            break
        if brand is not None:
            brand = None
        else:
            prefs = dict(list(prefs.items())[:1])
    fit = fit or pool
    return [it["item_id"] for it in rng.sample(fit, min(k, len(fit)))]


def _complement(rng: random.Random, intent: dict, traits: dict, names: set[str]) -> dict | None:
    options = [c for c in CATEGORIES[intent["category"]].complements if c in names]
    if not options:
        return None
    comp = rng.choice(options)
    same_domain = CATEGORIES[comp].domain == CATEGORIES[intent["category"]].domain
    brand = intent["brand"] if intent["brand"] and same_domain and rng.random() < 0.7 else None
    return _new_intent(rng, comp, traits, brand=brand)


def _event(item: dict, action: str, t: int) -> dict:
    return {"item_id": item["item_id"], "title": item["title"], "category": item["category"],
            "brand": item["brand"], "tags": list(item["tags"]), "action": action, "time": t}


def _user(rng: random.Random, cfg: WorldConfig, index: _Index, uid: str) -> dict:
    traits = {"colour": rng.choice(COLOURS), "price_band": rng.choice(PRICE_BANDS),
              "brand_loyalty": cfg.brand_loyal * (0.5 + rng.random())}
    names = set(index.cats)
    t = START_TIME + rng.randrange(0, 30 * 86400)
    intent = _new_intent(rng, rng.choice(index.cats), traits)
    sessions = []
    for s in range(rng.randint(*cfg.sessions)):
        n = rng.randint(*cfg.events_per_session)
        comp = _complement(rng, intent, traits, names) if rng.random() < cfg.complement_share else None
        events = []
        for j in range(n):
            t += rng.randint(20, 400)
            if rng.random() < cfg.noise:
                item = rng.choice(index.all)
                action = _action(rng, NOISE_ACTIONS)
            else:
                item = _pick_item(rng, index, intent, 0.45 if j < n / 2 else 0.85)
                action = _action(rng, ON_INTENT_ACTIONS)
            events.append(_event(item, action, t))
        if comp is not None:
            # a purchase session: it ends by buying an on-intent item; the next need is its complement
            item = _pick_item(rng, index, intent, 1.0)
            t += rng.randint(20, 400)
            events.append(_event(item, "purchase", t))
            target, kind = comp, "complementary"
        else:
            target, kind = intent, "behaviour"
        t += rng.randint(10, 300)
        sessions.append({"events": events, "time": t, "query": _query(rng, target), "intent": target,
                         "next_items": _next_items(rng, index, target), "target_kind": kind, "index": s})
        # drift to the next session's intent
        if comp is not None:
            intent = comp
        elif rng.random() < cfg.stay:
            intent = dict(intent, attributes=dict(intent["attributes"]))
            cat = CATEGORIES[intent["category"]]
            if rng.random() < 0.3:
                k = rng.choice(list(cat.attributes))
                intent["attributes"][k] = rng.choice(cat.attributes[k])
        else:
            intent = _new_intent(rng, rng.choice([c for c in index.cats if c != intent["category"]] or index.cats),
                                 traits)
        t += rng.randint(43200, 5 * 86400)
    return {"user_id": uid, "traits": traits, "sessions": sessions}


def generate(cfg: WorldConfig | None = None) -> World:
    """The catalogue and every user's sessions; a pure function of `cfg` (seeded)."""
    cfg = cfg or WorldConfig()
    rng = random.Random(cfg.seed)
    catalog = make_catalog(cfg, rng)
    index = _Index(catalog)
    users = [_user(rng, cfg, index, f"u{u:04d}") for u in range(cfg.n_users)]
    return World(catalog=catalog, users=users)


# ----------------------------------------------------------------------------- rows and streams


def rows_of(user: dict, history_len: int = 20) -> list[dict]:
    """One example row per session: the last `history_len` events up to the session's end (earlier
    sessions included), the session's query and next items; `intent` is the latent target intent."""
    rows, past = [], []
    for s in user["sessions"]:
        past.extend(s["events"])
        rows.append({
            "id": f"syn-{user['user_id']}-s{s['index']}", "user_id": user["user_id"], "time": s["time"],
            "history": [dict(e) for e in past[-history_len:]], "query": s["query"],
            "next_items": list(s["next_items"]), "source": "synthetic", "target_kind": s["target_kind"],
            "intent": {**s["intent"], "attributes": dict(s["intent"]["attributes"])},
        })  # fmt: skip
    return rows


def stream_of(user: dict) -> dict:
    """The user's whole behaviour as one stream (the drift-trigger replay): every event, oldest first, and
    each session's query after its last event."""
    events, queries = [], []
    for s in user["sessions"]:
        events.extend(dict(e) for e in s["events"])
        queries.append({"after_event": len(events) - 1, "time": s["time"], "query": s["query"],
                        "next_items": list(s["next_items"])})
    return {"user_id": user["user_id"], "events": events, "queries": queries}
