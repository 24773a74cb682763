"""Fixtures for the playground: a database with answers, votes and corrections, as the bot leaves them."""

from __future__ import annotations

import pytest

from playground.auth import Viewer
from store.examples import NewExample, add_examples
from store.interactions import record_interaction, record_vote


def seed_feedback(db) -> dict:
    """Four voted answers (two 👎, one with a correction) and two approved examples; returns their ids."""
    ids = {}
    ids["vpn"] = record_interaction(db, question="How do I set up the VPN on my laptop?", answer="Ask IT.",
                                    source="slack", channel_id="C_IT", user_id="U1",
                                    sources=[{"title": "VPN setup", "doc_path": "vpn-laptop-setup.md"}])
    record_vote(db, interaction_id=ids["vpn"], user_id="U1", vote=-1,
                correction="Install WireGuard from the Self-Service app and import the profile from it-portal.")
    ids["leave"] = record_interaction(db, question="怎么申请年假？", answer="在 HR 系统中提交申请。", source="slack",
                                      channel_id="C_HR", user_id="U2")
    record_vote(db, interaction_id=ids["leave"], user_id="U2", vote=1)
    ids["badge"] = record_interaction(db, question="I lost my office badge, what now?", answer="Buy a new one.",
                                      source="slack", channel_id="C_IT", user_id="U3")
    record_vote(db, interaction_id=ids["badge"], user_id="U3", vote=-1)
    ids["payroll"] = record_interaction(db, question="When is payday?", answer="On the 25th; ask payroll@example.com.",
                                        source="slack", channel_id="C_HR", user_id="U4")
    record_vote(db, interaction_id=ids["payroll"], user_id="U4", vote=1)
    add_examples(db, [NewExample("如何申请年假", "在 HR 门户提交年假申请，经理审批。"),
                      NewExample("Where is the Berlin office?", "Torstraße 1, Berlin.")], reviewer="import")
    return ids


@pytest.fixture
def seeded(db):
    return seed_feedback(db)


@pytest.fixture
def alice():
    return Viewer(name="alice", is_admin=True)


@pytest.fixture
def bob():
    return Viewer(name="bob", is_admin=False)
