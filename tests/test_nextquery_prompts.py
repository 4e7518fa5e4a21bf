"""envs.nextquery.prompts: the three templates, the adaptive rule, the registered builders."""

import pytest

from envs.nextquery import prompts
from envs.nextquery.prompts import (COMPACT_EVENTS, SYSTEM_PROMPT, build_messages, count_tokens, pick_template,
                                    render_prompt, template_features)
from rl.common import UserError
from rl.data import PROMPT_BUILDERS

NOW = 1_700_000_000  # Tuesday 2023-11-14 22:13 UTC


def event(i, category="running shoes", action="click", ago=3600, brand="Nordhaus"):
    return {"item_id": f"i{i:05d}", "title": f"{brand} item {i} in {category}".strip(), "category": category,
            "brand": brand, "tags": [category, brand], "action": action, "time": NOW - ago}


def row(history, **extra):
    return {"id": "t-1", "user_id": "u1", "time": NOW, "history": history, "query": "q", "next_items": [],
            "source": "synthetic", "target_kind": "behaviour", "intent": {}, **extra}


def test_full_lists_every_event_with_its_fields():
    r = row([event(1, ago=2 * 86400, action="purchase"), event(2, "tents", ago=7200, brand=""), event(3, ago=30)])
    text = render_prompt(r, "full")
    lines = text.splitlines()
    assert lines[0] == "Now: Tuesday 2023-11-14 22:13 UTC"
    assert lines[2] == "1. [2 d ago] purchase: Nordhaus item 1 in running shoes (category running shoes, brand Nordhaus)"
    assert lines[3] == "2. [2 h ago] click: item 2 in tents (category tents)"  # no brand: no ", brand"
    assert lines[4].startswith("3. [just now] click:")
    assert lines[-1] == "What will the user search for next?"


def test_max_events_keeps_the_latest():
    r = row([event(i, ago=1000 - i) for i in range(30)])
    text = render_prompt(r, "full", max_events=4)
    assert "item 29 " in text and "item 26 " in text and "item 25 " not in text


def test_compact_and_summary():
    hist = [event(i, "tents" if i % 3 == 0 else "socks", action="cart" if i == 9 else "click", ago=600 * (10 - i))
            for i in range(10)]
    compact = render_prompt(row(hist), "compact")
    assert compact.count("\n- ") == COMPACT_EVENTS and "item 3 " not in compact and "item 9 " in compact
    assert "category" not in compact  # fewer fields than full
    summary = render_prompt(row(hist), "summary")
    assert "Categories: socks x6, tents x4" in summary
    assert "Actions: click x9, cart x1" in summary
    assert summary.count("\n- ") == 3 and "10 min ago cart: Nordhaus item 9 in tents" in summary
    assert count_tokens(summary) < count_tokens(render_prompt(row(hist), "full"))


def test_empty_history_and_errors():
    assert "No recent behaviour." in render_prompt(row([]), "summary")
    with pytest.raises(UserError, match="unknown template 'long'.*'full', 'compact', 'summary'"):
        render_prompt(row([event(1)]), "long")
    with pytest.raises(UserError, match="no 'history' key"):
        render_prompt({"id": "x", "time": NOW}, "full")
    with pytest.raises(UserError, match="an event has no 'title' key"):
        render_prompt(row([{"action": "click", "time": NOW, "category": "c"}]), "full")
    with pytest.raises(ValueError):  # DataError is a ValueError too: rl.setup's row-0 check catches it
        render_prompt(row([event(1)]), "long")


def test_features():
    hist = [event(0, "tents", ago=9000, action="purchase")] + [event(i, ago=600 - i) for i in range(1, 6)]
    f = template_features(row(hist))
    assert f["n"] == 6 and f["focus"] == 1.0 and f["recency"] == 595
    assert f["diversity"] == pytest.approx(2 / 6) and f["strong"] == pytest.approx(1 / 6)
    assert template_features(row([]))["n"] == 0
    assert count_tokens("abcdefg") == 3  # the estimate without a tokenizer: ceil(7 / 3)


def test_pick_template_rule():
    focused = [event(i, ago=900 - i) for i in range(6)]
    assert pick_template(row(focused)) == "compact"
    spread = [event(i, f"cat{i % 6}", ago=86400 * (10 - i)) for i in range(10)]
    assert pick_template(row(spread)) == "summary"
    buyer = [event(i, f"cat{i % 2}", action="purchase", ago=86400 * (5 - i)) for i in range(4)]
    assert pick_template(row(buyer)) == "full"
    plain = [event(i, f"cat{i % 2}", ago=86400 * (5 - i)) for i in range(4)]
    assert pick_template(row(plain)) == "full"
    # a budget full does not fit: the next in the order that fits
    long_plain = [event(i, f"cat{i % 3}", ago=86400 * (21 - i)) for i in range(20)]
    full_size = count_tokens(render_prompt(row(long_plain), "full"))
    compact_size = count_tokens(render_prompt(row(long_plain), "compact"))
    assert pick_template(row(long_plain), budget_tokens=full_size) == "full"
    assert pick_template(row(long_plain), budget_tokens=full_size - 1) == "compact"
    # nothing fits: the shortest
    sizes = {t: count_tokens(render_prompt(row(long_plain), t)) for t in prompts.TEMPLATES}
    assert pick_template(row(long_plain), budget_tokens=1) == min(sizes, key=sizes.get)
    assert compact_size < full_size


def test_pick_template_counts_with_a_tokenizer(tiny_tokenizer):
    hist = [event(i, f"cat{i % 3}", ago=86400 * (21 - i)) for i in range(20)]
    n_full = count_tokens(render_prompt(row(hist), "full"), tiny_tokenizer)
    assert n_full == len(tiny_tokenizer(render_prompt(row(hist), "full"), add_special_tokens=False)["input_ids"])
    assert pick_template(row(hist), tiny_tokenizer, budget_tokens=n_full) == "full"
    assert pick_template(row(hist), tiny_tokenizer, budget_tokens=n_full - 1) != "full"


def test_registered_builders(tiny_tokenizer):
    hist = [event(i, ago=900 - i) for i in range(6)]
    msgs = PROMPT_BUILDERS.get("nextquery")(row(hist))
    assert msgs[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert msgs[1]["content"] == render_prompt(row(hist), "full")
    assert PROMPT_BUILDERS.get("nextquery")(row(hist, template="summary"))[1]["content"] == render_prompt(row(hist), "summary")
    adaptive = PROMPT_BUILDERS.get("nextquery_adaptive")(row(hist))
    assert adaptive[1]["content"] == render_prompt(row(hist), "compact")
    think = PROMPT_BUILDERS.get("nextquery_adaptive_think")(row(hist))
    assert "<query>" in think[0]["content"]
    text = tiny_tokenizer.apply_chat_template(build_messages(row(hist)), tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n" + SYSTEM_PROMPT) and text.endswith("<|im_start|>assistant\n")
