from playground.safety import find_sensitive, redact


def kinds(text):
    return [f.kind for f in find_sensitive(text)]


def test_finds_vendor_tokens_and_keys():
    assert kinds("use xoxb-123456789012-abcdefghijkl") == ["Slack token"]
    assert kinds("key sk-proj-abcdefghijklmnopqrstuvwx") == ["API key"]
    assert kinds("AKIAIOSFODNN7EXAMPLE is the key id") == ["AWS access key"]
    assert kinds("token ghp_" + "a" * 36) == ["GitHub token"]
    assert kinds("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----") == ["private key"]


def test_finds_passwords_but_not_the_word_password():
    assert kinds("The Wi-Fi password is Sunflower42") == ["password"]
    assert kinds("访客网络密码是 abc12345") == ["password"]
    assert kinds("Reset your password in the portal; passwords need 12 characters.") == []


def test_finds_personal_data_including_chinese_mobiles():
    assert kinds("write to jane.doe@example.com") == ["e-mail address"]
    assert kinds("手机 13812345678") == ["Chinese mobile number"]
    assert kinds("call +86 138 1234 5678") == ["Chinese mobile number"]
    assert kinds("call +49 30 1234 5678") == ["phone number"]
    assert kinds("身份证号 11010519491231002X") == ["Chinese ID number"]
    assert kinds("card 4111 1111 1111 1111") == ["card number"]


def test_ordinary_answers_are_not_flagged():
    text = ("Book rooms in the calendar. Office hours 09:00-18:00, floor 3, extension 4455. "
            "Payday is the 25th; the 2025-12-24 holiday is paid. Ticket IT-12345.")
    assert find_sensitive(text) == []
    assert find_sensitive("1234 5678 9012 3456") == []  # fails the Luhn check: not a card


def test_redact_replaces_every_finding_and_leaves_the_rest():
    text = "Mail bob@example.com, token xoxb-123456789012-abcdefghijkl, 手机 13812345678."
    out = redact(text)
    assert "bob@example.com" not in out and "xoxb-" not in out and "13812345678" not in out
    assert out.startswith("Mail [redacted e-mail address], token [redacted Slack token]")
    assert find_sensitive(out) == []


def test_finding_preview_hides_the_middle():
    (f,) = find_sensitive("xoxb-123456789012-abcdefghijkl")
    assert f.preview.startswith("xoxb") and "123456789012" not in f.preview


def test_playground_reads_the_one_scanner_in_the_store():
    import store.sensitive
    from playground import safety

    assert safety.find_sensitive is store.sensitive.find_sensitive


def test_secrets_the_old_patterns_missed():
    assert kinds("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY") == ["secret"]
    assert kinds("https://hooks.slack.com/services/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") == ["Slack token"]
    assert kinds("SLACK_SIGNING_SECRET=8f742231b10e8888abcd99aaa6885a5c") == ["secret"]
    assert kinds("sk_live_4eC39HqLyjWDarjtT1zdp7dc") == ["Stripe key"]
    assert kinds("-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBF0\n-----END PGP PRIVATE KEY BLOCK-----") == ["private key"]
    assert kinds("postgres://admin:s3cr3tPass@db.internal:5432/prod") == ["password in a URL"]
    assert kinds("Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l") == ["basic auth credentials"]


def test_personal_data_with_checksums():
    assert kinds("call (415) 555-0134") == ["phone number"]
    assert kinds("IBAN GB82 WEST 1234 5698 7654 32") == ["IBAN"]
    assert kinds("IBAN GB82 WEST 1234 5698 7654 33") == []  # fails MOD 97
    assert kinds("身份证 110105 19491231 002X") == ["Chinese ID number"]
    assert kinds("身份证 110105 19491231 0021") == []  # fails the check digit


def test_redact_removes_a_whole_private_key_block():
    text = "key:\n-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBF0AAAAB\n-----END PGP PRIVATE KEY BLOCK-----\nbye"
    out = redact(text)
    assert "lQOYBF0" not in out and out.endswith("bye")


def test_contact_details_are_shown_but_do_not_block():
    (email,) = find_sensitive("write to payroll@example.com")
    (token,) = find_sensitive("xoxb-123456789012-abcdefghijkl")
    assert not email.blocks and token.blocks
