from worker_orcd.engine.stop import StopMatcher


def feed(matcher: StopMatcher, pieces: list[str]) -> tuple[str, str | None]:
    emitted = []
    for piece in pieces:
        text, stop = matcher.push(piece)
        emitted.append(text)
        if stop is not None:
            return "".join(emitted), stop
    return "".join(emitted) + matcher.flush(), None


def test_a_stop_split_across_pieces_is_found_and_not_emitted():
    assert feed(StopMatcher(("\nUser:",)), ["Hel", "lo\nUs", "er:", " more"]) == (
        "Hello",
        "\nUser:",
    )


def test_text_that_only_looks_like_a_stop_is_released():
    matcher = StopMatcher(("END",))
    assert matcher.push("the EN") == ("the ", None)  # "EN" is held back
    assert matcher.push("D") == ("", "END")
    matcher = StopMatcher(("END",))
    assert matcher.push("the EN") == ("the ", None)
    assert matcher.push("TRY") == ("ENTRY", None)


def test_held_back_text_is_flushed_at_the_end():
    assert feed(StopMatcher(("###",)), ["a #", "#"]) == ("a ##", None)


def test_the_earliest_stop_wins():
    assert feed(StopMatcher(("cd", "b")), ["abcd"]) == ("a", "b")


def test_without_stops_everything_passes_through():
    matcher = StopMatcher(())
    assert matcher.push("abc") == ("abc", None)
    assert matcher.flush() == ""
