"""builtin:rotten_tomatoes_rotten_minority: every fresh review, one rotten review in KEEP_EVERY, no synopses."""

from tunesmith.data.minority import KEEP_EVERY, rotten_minority


def test_keeps_every_fresh_review_and_one_rotten_in_seven_in_file_order():
    records = ([{"category": "fresh", "text": f"f{i}"} for i in range(30)]
               + [{"category": "rotten", "text": f"r{i}"} for i in range(3 * KEEP_EVERY)]
               + [{"category": "plot", "text": "p"}])
    kept = rotten_minority(records)
    assert [r["text"] for r in kept if r["category"] == "rotten"] == ["r0", f"r{KEEP_EVERY}", f"r{2 * KEEP_EVERY}"]
    assert sum(r["category"] == "fresh" for r in kept) == 30
    assert not any(r["category"] == "plot" for r in kept)
