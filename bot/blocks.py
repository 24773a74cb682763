"""Block Kit rendering and mrkdwn escaping.

Everything that came from the model, the knowledge base or a user goes through `escape_mrkdwn` before it
reaches Slack: Slack parses `<…>` as control sequences (`<!channel>`, `<@U123>`, `<!subteam^S1>`,
`<http://evil|click>`), and its docs say to escape exactly `&`, `<`, `>` to show them literally
(https://api.slack.com/reference/surfaces/formatting#escaping). Slack's limits
(https://api.slack.com/reference/block-kit/blocks): 50 blocks per message, 3,000 characters per section
text, 2,000 per button value; we stay within them by construction, and tests check every block.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

import bot.messages as messages

MAX_BLOCKS = 50
MAX_SECTION_CHARS = 3000
MAX_CONTEXT_CHARS = 3000
FALLBACK_CHARS = 3000  # notifications show the start of `text`; the blocks carry the whole answer
FEEDBACK_BLOCK_ID = "feedback"
ACTION_UP = "feedback_up"
ACTION_DOWN = "feedback_down"
CORRECTION_CALLBACK = "feedback_correction"
CORRECTION_BLOCK = "correction"
CORRECTION_ACTION = "correction_text"

# Bare @channel/@here/@everyone only notify with link_names=1, which we never send; a zero-width space
# keeps them inert even if a proxy or a future default turns name linking on.
_BROADCAST = re.compile(r"@(channel|here|everyone)\b", re.IGNORECASE)
_ENTITY_TAIL = re.compile(r"&[a-z]{0,3}$")


def escape_mrkdwn(text: str | None) -> str:
    """Make arbitrary text safe and literal in Slack mrkdwn: it can ping nobody and forge no link."""
    if not text:
        return ""
    out = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _BROADCAST.sub("@\u200b\\1", out)


# In standard markdown (streamed answers' markdown_text) `]` followed by `(`, `[` or `:` can make a link whose
# text hides its target ([docs](http://evil), [docs][1] with "[1]: http://evil"); a zero-width space breaks it.
_MARKDOWN_LINK = re.compile(r"\](?=[(\[:])")
_BROADCAST_WORDS = ("channel", "here", "everyone")


def escape_markdown(text: str | None) -> str:
    """Make arbitrary text safe in standard markdown (chat.startStream / appendStream / stopStream's
    markdown_text): Slack's control characters as entities and @channel/@here/@everyone inert, as in
    escape_mrkdwn, and no markdown link can form."""
    return _MARKDOWN_LINK.sub("]\u200b", escape_mrkdwn(text))


def settled_markdown_length(text: str) -> int:
    """How much of a growing text can be escaped now: escape_markdown(text[:n]) is a prefix of escape_markdown
    of anything that continues it. Held back: a trailing `]` (a link may follow) and a trailing `@` word that
    may still become @channel/@here/@everyone."""
    n = len(text) - 1 if text.endswith("]") else len(text)
    at = text.rfind("@", 0, n)
    if at >= 0 and any(word.startswith(text[at + 1:n].lower()) for word in _BROADCAST_WORDS):
        n = at
    return n


def unescape_slack(text: str) -> str:
    """Slack escapes &, <, > in the text it sends us; the model should see the characters the user typed."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


# A control sequence in text Slack sends: a typed "<" arrives as &lt;, so every "<" opens one.
_CONTROL = re.compile(r"<([^<>]*)>")


def _plain_control(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    if target.startswith(("#", "@")):  # <#C123|general>, <#C123|>, <@U123>
        return target[0] + (label or target[1:])
    if target.startswith("!"):  # <!subteam^S1|@ops>, <!date^1392734382^{date}|Feb 18th>; <!here>, <!channel>
        return label or "@" + target[1:].split("^")[0]
    return label or target.removeprefix("mailto:")  # <https://wiki/vpn|the VPN page>, <https://wiki/vpn>


def plain_slack_text(text: str) -> str:
    """Slack's message text as the person typed it: a link as its label (its address when it has none), a
    channel as #name, a user or group as @name (or @ID), &amp;/&lt;/&gt; as characters. Slack's formatting
    reference (https://api.slack.com/reference/surfaces/formatting) lists the sequences."""
    return unescape_slack(_CONTROL.sub(_plain_control, text))


def _cut_point(text: str, limit: int) -> int:
    """Where to end a chunk of at most `limit` characters: a paragraph, line or word boundary in the second
    half of the window if there is one, and never inside an HTML entity such as `&amp;`."""
    if len(text) <= limit:
        return len(text)
    window = text[:limit]
    cut = limit
    for sep in ("\n\n", "\n", " "):
        pos = window.rfind(sep)
        if pos >= limit // 2:
            cut = pos + len(sep)
            break
    tail = _ENTITY_TAIL.search(text[:cut])
    if tail:
        cut = tail.start()
    return max(cut, 1)


def split_for_sections(text: str, limit: int = MAX_SECTION_CHARS) -> list[str]:
    """Split escaped mrkdwn into chunks that each fit one section block; ``` code fences that a cut
    would leave open are closed at the end of one chunk and reopened at the start of the next."""
    fence = "```"
    chunks: list[str] = []
    rest = text
    reopen = False
    budget = limit - 2 * (len(fence) + 1)  # room to close and reopen a fence
    while rest:
        cut = _cut_point(rest, budget)
        chunk, rest = rest[:cut], rest[cut:]
        if reopen:
            chunk = fence + "\n" + chunk
        open_fence = chunk.count(fence) % 2 == 1
        if open_fence and rest:
            chunk = chunk.rstrip("\n") + "\n" + fence
        reopen = open_fence and bool(rest)
        if chunk.strip():
            chunks.append(chunk)
    return chunks or [""]


def section(text: str) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:MAX_SECTION_CHARS]}}


def context(text: str) -> dict:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text[:MAX_CONTEXT_CHARS]}]}


def feedback_actions(interaction_id: int) -> dict:
    value = str(interaction_id)
    return {
        "type": "actions", "block_id": FEEDBACK_BLOCK_ID,
        "elements": [
            {"type": "button", "action_id": ACTION_UP, "value": value,
             "text": {"type": "plain_text", "text": messages.BUTTON_UP, "emoji": True}},
            {"type": "button", "action_id": ACTION_DOWN, "value": value,
             "text": {"type": "plain_text", "text": messages.BUTTON_DOWN, "emoji": True}},
        ],
    }


def sources_line(titles: Iterable[str]) -> str:
    seen: list[str] = []
    for t in titles:
        if t and t not in seen:
            seen.append(t)
    if not seen:
        return messages.NO_SOURCES
    return messages.SOURCES_LABEL + " " + " · ".join(escape_mrkdwn(t) for t in seen)


def answer_message(*, text: str, source_titles: Sequence[str], interaction_id: int | None,
                   footer: str | None = None, starting: bool = False,
                   verified_line: str | None = None, weak_match: bool = False) -> tuple[list[dict], str]:
    """(blocks, fallback text) for an answer: the escaped answer in section blocks, its sources (or, for a
    verified answer, who approved it), a small footer, and the 👍/👎 buttons carrying the interaction id.
    Within Slack's limits whatever `text` is."""
    body = escape_mrkdwn(text.strip()) or "…"
    tail = answer_tail(source_titles=source_titles, interaction_id=interaction_id, footer=footer,
                       starting=starting, verified_line=verified_line, weak_match=weak_match)
    chunks = split_for_sections(body)
    room = MAX_BLOCKS - len(tail)
    if len(chunks) > room:
        chunks = chunks[:room]
        keep = MAX_SECTION_CHARS - len(messages.TRUNCATED)
        last = chunks[-1]
        if len(last) > keep:
            last = last[: _cut_point(last, keep)]
        chunks[-1] = last + messages.TRUNCATED
    blocks = [section(c) for c in chunks] + tail
    return blocks, fallback_text(body)


def answer_tail(*, source_titles: Sequence[str], interaction_id: int | None, footer: str | None = None,
                starting: bool = False, verified_line: str | None = None, weak_match: bool = False) -> list[dict]:
    """The blocks under an answer's text: its sources (or who approved it; with `weak_match`, a caution that
    they barely cover the question), a footer, the 👍/👎 buttons.
    A streamed answer gets these at chat.stopStream, under the text it streamed."""
    tail: list[dict] = []
    if starting:
        tail.append(context(messages.STARTING_NOTE))
    elif verified_line:
        tail.append(context(messages.VERIFIED_MARK + " " + escape_mrkdwn(verified_line)))
    else:
        tail.append(context(sources_line(source_titles)))
        if weak_match and source_titles:
            tail.append(context(messages.WEAK_MATCH_NOTE))
    if footer and not verified_line:
        tail.append(context(escape_mrkdwn(footer)))
    if interaction_id is not None:
        tail.append(feedback_actions(interaction_id))
    return tail


def fallback_text(escaped: str) -> str:
    """The `text` field (notifications, screen readers): escaped, shortened without cutting an entity."""
    if len(escaped) <= FALLBACK_CHARS:
        return escaped
    cut = _cut_point(escaped, FALLBACK_CHARS - 1)
    return escaped[:cut].rstrip() + "…"


def plain_message(text_mrkdwn: str) -> tuple[list[dict], str]:
    """A message of our own (already mrkdwn, with any outside values escaped by the caller)."""
    chunks = split_for_sections(text_mrkdwn)[:MAX_BLOCKS]
    return [section(c) for c in chunks], fallback_text(text_mrkdwn)


def correction_modal(*, interaction_id: int, question: str, metadata: dict | None = None) -> dict:
    """The 👎 modal: an optional multiline "What would the right answer be?" input."""
    private = json.dumps({"interaction_id": interaction_id, **(metadata or {})})
    q = escape_mrkdwn(question)
    if len(q) > 2000:
        q = q[: _cut_point(q, 1999)] + "…"
    return {
        "type": "modal", "callback_id": CORRECTION_CALLBACK, "private_metadata": private[:3000],
        "title": {"type": "plain_text", "text": messages.MODAL_TITLE},
        "submit": {"type": "plain_text", "text": messages.MODAL_SUBMIT},
        "close": {"type": "plain_text", "text": messages.MODAL_CLOSE},
        "blocks": [
            section(messages.MODAL_INTRO),
            section(f"*{messages.MODAL_QUESTION_LABEL}:* {q}"),
            {"type": "input", "block_id": CORRECTION_BLOCK, "optional": True,
             "label": {"type": "plain_text", "text": messages.MODAL_INPUT_LABEL},
             "hint": {"type": "plain_text", "text": messages.MODAL_INPUT_HINT},
             "element": {"type": "plain_text_input", "action_id": CORRECTION_ACTION, "multiline": True,
                         "max_length": messages.CORRECTION_MAX}},
        ],
    }
