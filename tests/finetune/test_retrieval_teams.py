"""Team privacy holds in cross-language retrieval too: a Chinese question finds its own team's English page and
never another team's (the dense ranking, where the two languages meet, is where a leak would show)."""

from finetune.serving.retrieval import embed_missing_passages, retrieve_passages
from store.documents import import_documents
from store.teams import add_team

PAGE = ("# Parking permits\n\nEmployees who drive to the Lisbon office apply for a parking permit in the facilities "
        "portal. Permits are renewed every January and cost nothing; the garage entrance is on Rua Augusta.")
QUESTION = "在里斯本办公室怎么申请停车证？"  # "How do I get a parking permit at the Lisbon office?"


def test_a_chinese_question_finds_its_teams_english_page_and_never_another_teams(db, tmp_path):
    add_team(db, "ops", ("C0OPS",))
    add_team(db, "sales", ("C0SALES",))
    folder = tmp_path / "ops-kb"
    folder.mkdir()
    (folder / "parking.md").write_text(PAGE, encoding="utf-8")
    import_documents(db, [folder], team="ops")
    embed_missing_passages(db)

    assert [p.doc_path for p in retrieve_passages(db, QUESTION, team="ops")] == ["parking.md"]
    assert retrieve_passages(db, QUESTION, team="sales") == []
    assert retrieve_passages(db, QUESTION) == []  # no team: shared passages only
