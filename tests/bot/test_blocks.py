"""Block Kit rendering: escaping that neutralises every Slack control sequence, splitting within limits."""

from __future__ import annotations

import pytest

from bot.blocks import (
    MAX_BLOCKS,
    MAX_SECTION_CHARS,
    answer_message,
    correction_modal,
    escape_mrkdwn,
    split_for_sections,
    unescape_slack,
)
from tests.fakes.slack_api import block_errors


@pytest.mark.parametrize("evil", [
    "<!channel>", "<!here>", "<!everyone>", "<@U123>", "<@U123|bob>", "<!subteam^S0614TZR7|@team>",
    "<http://evil.example|click>", "<mailto:a@b.c|mail>", "<#C123>", "<!date^1392734382^{date}|x>",
])
def test_control_sequences_are_rendered_literally(evil):
    out = escape_mrkdwn(f"before {evil} after")
    assert "<" not in out and ">" not in out
    assert unescape_slack(out) == f"before {evil} after".replace("@everyone", "@\u200beveryone")


def test_ampersand_escaped_first_so_entities_cannot_be_smuggled():
    assert escape_mrkdwn("&lt;!channel&gt;") == "&amp;lt;!channel&amp;gt;"


def test_bare_broadcast_words_are_inert():
    out = escape_mrkdwn("ping @channel @here @everyone but not email@channel.example")
    assert "@channel " not in out and "@here " not in out and "@everyone" not in out


def test_split_respects_limit_and_entities_and_loses_nothing():
    text = escape_mrkdwn(("a&b <x> " * 500 + "\n") * 10)
    chunks = split_for_sections(text)
    assert all(len(c) <= MAX_SECTION_CHARS for c in chunks)
    for c in chunks:  # never a chunk ending or starting inside &amp; / &lt; / &gt;
        assert not c.rstrip().endswith(("&", "&a", "&am", "&l", "&g", "&lt", "&gt", "&amp"))
    assert "".join(chunks) == text


def test_split_closes_and_reopens_code_fences():
    text = "```\n" + "\n".join(f"line {i} " + "x" * 50 for i in range(200)) + "\n```"
    chunks = split_for_sections(text)
    assert len(chunks) > 1
    assert all(c.count("```") % 2 == 0 for c in chunks)
    assert all(len(c) <= MAX_SECTION_CHARS for c in chunks)


def test_single_unbroken_word_longer_than_a_block():
    chunks = split_for_sections("x" * 7000)
    assert [len(c) for c in chunks] and all(len(c) <= MAX_SECTION_CHARS for c in chunks)
    assert "".join(chunks) == "x" * 7000


def test_answer_message_shape():
    blocks, text = answer_message(text="Use the <VPN> portal", source_titles=["VPN guide", "VPN guide", "IT <FAQ>"],
                                  interaction_id=42, footer="adapter v2 · 0.4 s")
    assert text == "Use the &lt;VPN&gt; portal"
    assert blocks[0] == {"type": "section", "text": {"type": "mrkdwn", "text": "Use the &lt;VPN&gt; portal"}}
    sources = blocks[1]["elements"][0]["text"]
    assert sources.count("VPN guide") == 1 and "IT &lt;FAQ&gt;" in sources
    actions = blocks[-1]
    assert [(e["action_id"], e["value"]) for e in actions["elements"]] == [("feedback_up", "42"), ("feedback_down", "42")]
    assert block_errors(blocks) == []


def test_a_verified_answer_names_who_approved_it_escaped_with_buttons_and_no_unreliable_note():
    from bot import messages
    from bot.questions import render_answer
    from finetune.serving.engine import Answer

    answer = Answer("Next to <!here> reception.", [], None, 12, 7, None, verified=True, example_id=3,
                    approved_by="<@U999>", approved_at="2026-11-30T10:00:00+00:00")
    blocks, _ = render_answer(answer)
    context_text = blocks[1]["elements"][0]["text"]
    assert context_text.startswith(messages.VERIFIED_MARK) and "2026-11-30" in context_text
    assert "<@U999>" not in context_text and "&lt;@U999&gt;" in context_text  # a reviewer's name cannot ping
    assert messages.NO_SOURCES not in str(blocks) and "<!here>" not in str(blocks)
    assert blocks[-1]["type"] == "actions" and block_errors(blocks) == []


def test_an_answer_from_weakly_matching_passages_says_so_under_its_sources():
    from bot import messages
    from bot.questions import render_answer, render_tail
    from finetune.serving.engine import Answer, Source

    sources = [Source("Company seal", "legal/seal.md")]
    weak = Answer("The seal is kept by legal.", sources, "v3", 800, 9, "weak_match; trimmed: passages")
    blocks, _ = render_answer(weak)
    contexts = [b["elements"][0]["text"] for b in blocks if b["type"] == "context"]
    assert contexts[0].startswith(messages.SOURCES_LABEL) and contexts[1] == messages.WEAK_MATCH_NOTE
    assert blocks[-1]["type"] == "actions" and block_errors(blocks) == []
    assert messages.WEAK_MATCH_NOTE in str(render_tail(weak))  # a streamed answer ends the same way
    for other in (Answer("The seal is kept by legal.", sources, "v3", 800, 9, None),
                  Answer("The seal is kept by legal.", sources, "v3", 800, 9, "unbacked")):
        assert messages.WEAK_MATCH_NOTE not in str(render_answer(other)[0])


def test_huge_answer_is_truncated_to_fifty_blocks():
    blocks, text = answer_message(text="word " * 60_000, source_titles=[], interaction_id=1)
    assert len(blocks) == MAX_BLOCKS and block_errors(blocks) == []
    assert "shortened" in [b for b in blocks if b["type"] == "section"][-1]["text"]["text"]
    assert blocks[-1]["type"] == "actions" and len(text) <= 3000


def test_no_buttons_without_an_interaction():
    blocks, _ = answer_message(text="loading", source_titles=[], interaction_id=None, starting=True)
    assert all(b["type"] != "actions" for b in blocks)


def test_correction_modal_within_limits():
    view = correction_modal(interaction_id=7, question="<!channel> " + "q" * 5000)
    assert view["callback_id"] == "feedback_correction" and len(view["private_metadata"]) <= 3000
    assert "<!channel>" not in str(view["blocks"]) and block_errors(view["blocks"]) == []
