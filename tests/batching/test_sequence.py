"""Text leaves a sequence only when final: split UTF-8 characters and possible stop-string starts wait."""

from __future__ import annotations

from workers.sequence import TextStream, holdback


def test_holdback_is_the_longest_stop_prefix_at_the_end() -> None:
    assert holdback("hello wor", ("world",)) == 3
    assert holdback("hello", ("world",)) == 0
    assert holdback("ab", ("abc", "bx")) == 2


def test_a_stop_string_split_over_pieces_is_held_back_then_cut() -> None:
    s = TextStream(("STOP",))
    released = [s.feed(b"one S"), s.feed(b"T"), s.feed(b"OP two")]
    assert released == ["one ", "", ""]
    assert s.stopped and s.text == "one "
    assert s.flush() == ""


def test_a_false_start_is_released_once_it_cannot_match() -> None:
    s = TextStream(("STOP",))
    assert s.feed(b"a ST") == "a "
    assert s.feed(b"AR") == "STAR"
    assert s.flush() == "" and s.text == "a STAR" and not s.stopped


def test_a_character_split_over_tokens_waits_for_its_last_byte() -> None:
    s = TextStream(())
    euro = "€".encode()
    assert s.feed(b"x" + euro[:1]) == "x"
    assert s.feed(euro[1:2]) == ""
    assert s.feed(euro[2:]) == "€"
    assert s.text == "x€"


def test_the_earliest_of_several_stops_wins() -> None:
    s = TextStream(("b", "a"))
    assert s.feed(b"xxab") == "xx" and s.stopped
